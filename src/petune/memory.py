"""Host-memory hygiene for training on CPU.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), so after the
first step most activation tensors come from the heap, and the memory a backward pass frees stays in
the process, fragmented: peak RSS grows step after step. Two remedies, measured on SmolLM2-135M,
LoRA, fp32, batch 4 x 256, three steps, petune's fused loss:

- `trim_freed_memory()` after each optimizer step: 2918 MB -> 2580 MB peak RSS, but the step took
  5.70 s instead of 4.39 s (trimmed pages are faulted in again next step);
- `return_freed_memory_to_os()` once at start-up (fix the mmap threshold, so every large block is
  mapped and unmapped on its own). Measured on the idle 2 cores (`benchmarks/step.py`, petune, same case):
  glibc's default 2718 / 2724 MB at 4.48 / 4.15 s a step; threshold 128 KB 1730 MB at 6.0 s; 1 MB
  1945 MB at 4.9 s; 2 MB 1900 MB at 5.0 s; 4 MB 2693 MB at 4.2 s (the 2.4 MB hidden-state tensors are what
  fragments the heap). The time goes to page faults: each step maps its memory in again.

Neither is on by default: both trade time for memory. What `petune` commands do instead is run on
mimalloc (`allocator_environment`, `running_allocator`; the `cmeel-mimalloc` wheel, Linux x86_64 and aarch64)
with page purging off: its size-segregated pages do not fragment the way glibc's heap does, and memory it
keeps is reused without page faults. Same case, `benchmarks/step.py`, idle 2 cores: 1817 MB at 3.8-4.2 s a
step against glibc's 2769 MB at 4.2 s (with purging on, mimalloc's default: 1792 MB at 5.2 s); arenas
committed as they are used rather than at once (MIMALLOC_ARENA_EAGER_COMMIT=0) took it to 1747 MB at 4.2 s
(the imports alone: 291 -> 263 MB of anonymous memory; glibc 251). A process cannot change its allocator
once it runs, so the `petune` console script starts itself again with `LD_PRELOAD` set
(`petune.cli.entry`); set PETUNE_ALLOCATOR=system to keep glibc. Your own script gets the same with
`env $(python -m petune.memory) python train.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_DEFAULT_THRESHOLD = 128 * 1024
ALLOCATOR_VARIABLE = "PETUNE_ALLOCATOR"  # "mimalloc" (the default where the library is installed) or "system"
ALLOCATORS = ("mimalloc", "system")
MIMALLOC_SETTINGS = {
    "MIMALLOC_PURGE_DELAY": "-1",  # never give freed pages back to the OS: reuse them, without page faults
    "MIMALLOC_ARENA_EAGER_COMMIT": "0",  # commit arena memory as it is used, not all at once
}


@functools.cache
def _glibc() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def trim_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (`malloc_trim(0)`); True if any were released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def return_freed_memory_to_os(threshold_bytes: int = _DEFAULT_THRESHOLD) -> bool:
    """Map every block above `threshold_bytes` on its own; True if it took effect (glibc only)."""
    libc = _glibc()
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes)) if libc is not None else False


def mimalloc_library() -> Path | None:
    """The mimalloc shared library of the installed `cmeel-mimalloc` wheel, or None."""
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    found = sorted(Path(str(f.locate())) for f in files if f.name.startswith("libmimalloc.so"))
    return next((path for path in found if path.is_file()), None)


def wanted_allocator(environ: Mapping[str, str]) -> str:
    """PETUNE_ALLOCATOR's value (default "mimalloc"); a clear error for any other."""
    wanted = environ.get(ALLOCATOR_VARIABLE, "mimalloc").strip().lower() or "mimalloc"
    if wanted not in ALLOCATORS:
        raise ValueError(
            f"{ALLOCATOR_VARIABLE}={wanted!r} is not an allocator petune knows: "
            "set it to mimalloc or system, or unset it"
        )
    return wanted


def allocator_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` for a process that runs on mimalloc with `MIMALLOC_SETTINGS`, or None when it would not.

    None where the user asked for the system allocator, where mimalloc is not installed, or off Linux.
    A user's own LD_PRELOAD and MIMALLOC_* settings are kept.
    """
    library = mimalloc_library()
    if wanted_allocator(environ) != "mimalloc" or library is None or not sys.platform.startswith("linux"):
        return None
    preload = [str(library), *(part for part in environ.get("LD_PRELOAD", "").split(":") if part)]
    return {**MIMALLOC_SETTINGS, **environ, "LD_PRELOAD": ":".join(preload)}


def running_allocator() -> str:
    """The allocator this process runs on: "mimalloc" where its library is mapped, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


if __name__ == "__main__":  # `env $(python -m petune.memory) python train.py`
    environment = allocator_environment({**os.environ, ALLOCATOR_VARIABLE: "mimalloc"})
    if environment is None:
        sys.exit("petune.memory: mimalloc is not installed; pip install cmeel-mimalloc (Linux x86_64 or aarch64)")
    print(" ".join(f"{name}={environment[name]}" for name in ("LD_PRELOAD", *MIMALLOC_SETTINGS)))

"""What a CPU training process holds besides its tensors, measured once on this machine and interpreter.

The interpreter with torch, transformers and petune imported, plus what the first training steps add (kernel
code paged in, oneDNN and allocator arenas), depends on the install more than on the model: the same packages in
a freshly built virtual environment measured 50-70 MiB more here, all of it file-backed pages of the shared
libraries (RssFile), none of it anonymous memory. So `petune plan --gpu cpu` does not use a constant: it runs
`python -m petune.plan.measure --overhead` (a 2-layer model whose tensors are a few kB) once per interpreter and
install, and keeps the result under the petune cache folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MIB = 2**20
# Used only when the measurement cannot run: this project's machine (Python 3.11, torch 2.13 CPU, transformers
# 5.24, 1 thread): 335 MiB after the imports, 24 MiB more after three steps of the 2-layer model.
FALLBACK_IMPORTS_BYTES = 335 * MIB
FALLBACK_FIRST_STEPS_BYTES = 24 * MIB


@dataclass(frozen=True)
class CpuOverhead:
    imports_bytes: int  # resident after importing torch, transformers and petune
    first_steps_bytes: int  # what three training steps of a model with kB of tensors add

    @property
    def total_bytes(self) -> int:
        return self.imports_bytes + self.first_steps_bytes


@functools.cache
def cpu_overhead() -> CpuOverhead:
    """This interpreter's CPU overhead: from the cache file, else measured in a child process (a few seconds)."""
    path = _cache_file()
    try:
        saved = json.loads(path.read_text())
        return CpuOverhead(int(saved["imports_bytes"]), int(saved["first_steps_bytes"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done = subprocess.run(
        [sys.executable, "-m", "petune.plan.measure", "--overhead"], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        print(
            f"petune plan: could not measure this CPU's overhead; using this project's machine's figures\n"
            f"{done.stderr[-500:]}",
            file=sys.stderr,
        )
        return CpuOverhead(FALLBACK_IMPORTS_BYTES, FALLBACK_FIRST_STEPS_BYTES)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    overhead = CpuOverhead(
        imports_bytes=int(result["before_mb"] * MIB),
        first_steps_bytes=int(max(result["peak_mb"] - result["before_mb"], 0) * MIB),
    )
    _save(path, {"imports_bytes": overhead.imports_bytes, "first_steps_bytes": overhead.first_steps_bytes})
    return overhead


def _save(path: Path, measured: dict[str, int]) -> None:
    """Write a measurement to its cache file atomically (a concurrent `petune plan` reads it whole or not at all)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(measured))
    partial.replace(path)


def _cache_file() -> Path:
    """One file per interpreter, install and allocator: its path, the versions, when torch was installed."""
    from petune.embedded import cache_dir
    from petune.memory import running_allocator

    parts = [sys.executable, sys.prefix, running_allocator()]  # the `petune` command runs on mimalloc
    for package in ("torch", "transformers", "petune"):
        try:
            parts.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} missing")
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is not None and torch_spec.origin:  # a reinstall of the same version is another install
        with contextlib.suppress(OSError):
            parts.append(str(Path(torch_spec.origin).stat().st_mtime_ns))
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / "plan" / f"cpu-overhead-{key}.json"


ENGINE_CHILD = """
import os, socket, sys
def resident():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
import petune.train.loop  # what a training process has imported before its engine starts
before = resident()
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
print(resident() - before)
"""


@functools.cache
def engine_overhead_bytes(strategy: str) -> int:
    """What a CPU training process of `strategy` holds for its engine's library beyond `cpu_overhead`: DeepSpeed's
    modules and its process group under zero2 and zero3 (`petune.train.strategy.make_accelerator` imports it and
    calls `init_distributed` before the model loads; SmolLM2 traces: +180 MB a process there, 100 of it anonymous).
    torch's own DDP and FSDP2 are in the imports already. Measured once per install in a child process, like
    `cpu_overhead`; 0 when DeepSpeed is not installed or the measurement fails."""
    if not strategy.startswith("zero") or importlib.util.find_spec("deepspeed") is None:
        return 0
    cpu = _cache_file()
    path = cpu.with_name(cpu.stem + "-deepspeed.json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(path.read_text())["engine_bytes"])
    done = subprocess.run([sys.executable, "-c", ENGINE_CHILD], capture_output=True, text=True, timeout=600)
    try:
        measured = max(int(done.stdout.strip().splitlines()[-1]), 0)
    except (ValueError, IndexError):
        print(f"petune plan: could not measure DeepSpeed's overhead\n{done.stderr[-500:]}", file=sys.stderr)
        return 0
    _save(path, {"engine_bytes": measured})
    return measured

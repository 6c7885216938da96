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

Neither is on by default in `petune train`: both trade time for memory. Call one yourself when host
memory, not time, is the limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_DEFAULT_THRESHOLD = 128 * 1024


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

"""benchmarks/heap_growth.py reads glibc's main heap, which grows when the process keeps small blocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from petune.memory import running_allocator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import heap_growth
before = heap_growth.main_heap_mb()
kept = [bytearray(1000) for _ in range(200_000)]  # 200 MB in blocks below the mmap threshold: the heap's own
print(before, heap_growth.main_heap_mb())
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or running_allocator() != "system", reason="glibc's malloc only"
)
def test_the_main_heap_grows_with_small_blocks_kept() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(BENCHMARKS)], capture_output=True, text=True, timeout=120, check=True
    )
    before, after = (int(word) for word in done.stdout.split())
    assert 150 <= after - before <= 260

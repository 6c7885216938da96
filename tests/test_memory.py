"""glibc malloc tuning where there is one (the effect on peak RSS is measured in BENCHMARKS.md)."""

import ctypes.util
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_mallopt_and_trim_take_effect_on_glibc():
    # In a child process: the settings are process-wide and must not leak into other tests.
    code = (
        "import torch\n"
        "from petune.memory import return_freed_memory_to_os as tune, trim_freed_memory as trim\n"
        "blocks = [torch.ones(1 << 16) for _ in range(2000)]  # 2000 x 256 KB on the heap\n"
        "del blocks[::2]; del blocks  # freed, fragmented\n"
        "print(tune(), tune(1 << 20), trim())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]

"""`return_freed_memory_to_os` tunes glibc's malloc where there is one."""

import ctypes.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="glibc only")
def test_mallopt_takes_effect_on_glibc():
    # In a child process: the setting is process-wide and must not leak into other tests.
    code = "from petune.memory import return_freed_memory_to_os as f; print(f(), f(1 << 20))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]

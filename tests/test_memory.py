"""Host memory: glibc malloc tuning, and the mimalloc the `petune` command runs on (effects in BENCHMARKS.md)."""

import ctypes.util
import importlib
import os
import subprocess
import sys

import pytest

from petune import memory

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


# --- the allocator the `petune` command runs on -------------------------------------------------------

MIMALLOC = memory.mimalloc_library() is not None and sys.platform.startswith("linux")


def run_console_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`petune ARGS` as the installed console script runs it (`petune.cli.entry`), in a child process."""
    code = f"import sys; from petune.cli import entry; sys.argv = ['petune', *{list(args)!r}]; sys.exit(entry())"
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", memory.ALLOCATOR_VARIABLE)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**environment, **env})


@pytest.mark.skipif(not MIMALLOC, reason="mimalloc (cmeel-mimalloc) is installed on Linux x86_64/aarch64 only")
def test_petune_command_runs_on_mimalloc_unless_told_not_to():
    assert run_console_script("--version").stdout.strip().endswith("(host allocator: mimalloc)")
    kept = run_console_script("--version", PETUNE_ALLOCATOR="system")
    assert kept.stdout.strip().endswith("(host allocator: system)")
    # this test process itself was not changed: the command started a new one
    assert memory.running_allocator() == "system"


def test_unknown_allocator_is_refused_by_name():
    done = run_console_script("--version", PETUNE_ALLOCATOR="jemalloc")
    assert done.returncode == 2
    assert "PETUNE_ALLOCATOR='jemalloc'" in done.stderr and "mimalloc" in done.stderr
    with pytest.raises(ValueError, match="PETUNE_ALLOCATOR"):
        memory.allocator_environment({"PETUNE_ALLOCATOR": "jemalloc"})


@pytest.mark.skipif(not MIMALLOC, reason="mimalloc (cmeel-mimalloc) is installed on Linux x86_64/aarch64 only")
def test_allocator_environment_keeps_the_users_settings():
    library = str(memory.mimalloc_library())
    env = memory.allocator_environment({"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "LD_PRELOAD": library,
        "MIMALLOC_PURGE_DELAY": "-1",
        "MIMALLOC_ARENA_EAGER_COMMIT": "0",
    }
    env = memory.allocator_environment({"LD_PRELOAD": "/opt/libmine.so", "MIMALLOC_PURGE_DELAY": "50"})
    assert env is not None
    assert env["LD_PRELOAD"] == f"{library}:/opt/libmine.so" and env["MIMALLOC_PURGE_DELAY"] == "50"
    assert memory.allocator_environment({"PETUNE_ALLOCATOR": "system"}) is None
    assert memory.allocator_environment({"PETUNE_ALLOCATOR": " MIMALLOC "}) is not None


@pytest.mark.skipif(not MIMALLOC, reason="mimalloc (cmeel-mimalloc) is installed on Linux x86_64/aarch64 only")
def test_module_prints_the_environment_for_a_users_own_script():
    printed = subprocess.run(
        [sys.executable, "-m", "petune.memory"], capture_output=True, text=True, check=True
    ).stdout.split()
    settings = dict(item.split("=", 1) for item in printed)
    assert settings["LD_PRELOAD"].split(":")[0] == str(memory.mimalloc_library())
    code = "from petune.memory import running_allocator; print(running_allocator())"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **settings})
    assert ran.stdout.strip() == "mimalloc"


def test_importing_petune_does_not_load_torch():
    # `entry` starts the command again before the real work; that costs nothing only while this holds
    code = "import sys, petune, petune.memory, petune.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_public_name_resolves_lazily():
    import petune

    names = set(petune.__all__) - {"__version__"}
    assert names == set(petune._SOURCES)
    for name in names:
        assert getattr(petune, name) is getattr(importlib.import_module(petune._SOURCES[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'LoRAConfig'"):
        _ = petune.LoRAConfig

"""constraints.txt (the tested versions) and scripts/moved.py, which `make test-latest` uses to say what moved."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import moved  # noqa: E402


def test_every_dependency_of_petune_and_its_dev_extras_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("dev", "qlora"):
        wanted += [spec for spec in project["optional-dependencies"][extra] if not spec.startswith("petune[")]
    _, pins = moved.read_constraints(ROOT / "constraints.txt")
    names = {moved.canonical(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in wanted}
    assert sorted(names - pins.keys()) == [], "run `make test-latest` and `make constraints`"


def test_the_suite_runs_on_the_pinned_versions_of_what_it_tests_against() -> None:
    """The venv `make test` built must match constraints.txt for the libraries petune is proven against."""
    if Path(sys.prefix).name == ".venv-latest":
        pytest.skip("make test-latest runs on the newest versions on purpose")
    _, pins = moved.read_constraints(ROOT / "constraints.txt")
    current = moved.installed()
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes"):
        assert current[name][1] == pins[name][1], f"{name}: installed {current[name][1]}, pinned {pins[name][1]}"


def test_changes_lists_moved_new_and_gone_packages(tmp_path: Path) -> None:
    path = tmp_path / "constraints.txt"
    path.write_text("# tested set\n\nTorch==2.13.0\ntyping_extensions==4.16.0\nold-thing==1.0\n")
    header, pins = moved.read_constraints(path)
    assert header == ["# tested set", ""]
    current = {
        "torch": ("torch", "2.14.1"),
        "typing-extensions": ("typing_extensions", "4.16.0"),
        "kernels": ("kernels", "0.19.1"),
    }
    assert moved.changes(pins, current) == [
        "new    kernels 0.19.1",
        "gone   old-thing 1.0",
        "moved  torch 2.13.0 -> 2.14.1",
    ]


def test_a_line_that_is_not_a_pin_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "constraints.txt"
    path.write_text("torch>=2.4\n")
    with pytest.raises(SystemExit, match=re.escape("constraints.txt:1: expected 'name==version', got 'torch>=2.4'")):
        moved.read_constraints(path)

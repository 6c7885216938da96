"""The test tree must never hide an installed package.

pytest imports a test file under the name it gets by walking up through folders that hold an `__init__.py`,
and puts the folder above the last of them on `sys.path`. Before `tests/` was a package of its own, `tests/`
itself went on `sys.path`, so the folder `tests/kernels` shadowed the PyPI package `kernels` that
transformers 5.25 started importing, and every test failed at collection. This file checks the layout rule
that keeps it from coming back: every folder under `tests/` that holds Python is a package, so the only
top-level name the suite adds is `tests`, and no installed distribution provides that name.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def top_level_name(path: Path) -> str:
    """The first component of the module name pytest's default (prepend) import mode gives `path`."""
    folder = path.parent
    name = path.stem
    while (folder / "__init__.py").exists():
        name = folder.name
        folder = folder.parent
    return name


def test_every_test_folder_is_a_package() -> None:
    missing = sorted(
        str(folder.relative_to(TESTS.parent))
        for folder in {p.parent for p in TESTS.rglob("*.py")}
        if "__pycache__" not in folder.parts and not (folder / "__init__.py").exists()
    )
    assert not missing, f"add an __init__.py to {missing}: without one pytest puts the folder on sys.path"


def test_the_suite_adds_only_the_name_tests_and_no_distribution_owns_it() -> None:
    names = {top_level_name(path) for path in TESTS.rglob("*.py") if "__pycache__" not in path.parts}
    assert names == {"tests"}
    installed = importlib.metadata.packages_distributions()
    assert "tests" not in installed, f"installed distributions {installed['tests']} ship a top-level 'tests'"


def test_top_level_name_walks_up_through_packages(tmp_path: Path) -> None:
    (tmp_path / "outer" / "inner").mkdir(parents=True)
    (tmp_path / "outer" / "inner" / "__init__.py").touch()
    (tmp_path / "outer" / "inner" / "test_x.py").touch()
    assert top_level_name(tmp_path / "outer" / "inner" / "test_x.py") == "inner"
    (tmp_path / "outer" / "__init__.py").touch()
    assert top_level_name(tmp_path / "outer" / "inner" / "test_x.py") == "outer"

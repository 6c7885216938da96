"""BENCHMARKS.md is partly generated and partly written by hand: a benchmark rewrites only its own section.

A section runs from its `## ` heading to the next `## ` heading (or the end of the file); `### ` subsections
belong to the section above them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

TITLE = "# Benchmarks: petune vs HF PEFT"
HERE = Path(__file__).resolve().parent


def write_section(path: Path, heading: str, text: str) -> None:
    """Put `text` (which starts with `heading`) into `path` in place of the section under `heading`, else at the
    end; a new file gets TITLE first. Everything outside that section is kept as it was."""
    old = path.read_text() if path.is_file() else f"{TITLE}\n"
    start = f"\n{old}".find(f"\n{heading}\n")  # the heading as a whole line
    if start < 0:
        path.write_text(f"{old.rstrip()}\n\n{text}")
        return
    end = old.find("\n## ", start + len(heading))
    rest = old[end + 1 :] if end >= 0 else ""
    path.write_text(old[:start] + text + (f"\n{rest}" if rest else ""))


def checkout() -> str:
    """The code a benchmark runs, for its section: `commit <hash>`, with `+ uncommitted changes` when tracked
    files other than BENCHMARKS.md (which benchmarks write) differ from it; an empty string outside git."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"commit {head}" + (" + uncommitted changes" if changed else "")


def stamped(note: str) -> str:
    """A section's note after its command: the code measured (`checkout`), then the user's `note`."""
    return ", ".join(part for part in (checkout(), note) if part)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=True)
    return done.stdout.strip()

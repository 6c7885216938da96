"""The benchmark report: a run rewrites only its own section of BENCHMARKS.md and says which targets it meets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run
import sections
from sections import TITLE, write_section

HEADING = "## Step table"


def test_a_section_replaces_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        f"{TITLE}\n\nintro\n\n{HEADING}\n\nold table\n\n### kept with it\n\nold\n\n## Analysis\n\nby hand\n"
    )
    write_section(path, HEADING, f"{HEADING}\n\nnew table\n")
    assert path.read_text() == f"{TITLE}\n\nintro\n\n{HEADING}\n\nnew table\n\n## Analysis\n\nby hand\n"
    write_section(path, "## End-to-end", "## End-to-end\n\nnumbers\n")  # a new section goes at the end
    assert path.read_text().endswith("## Analysis\n\nby hand\n\n## End-to-end\n\nnumbers\n")
    write_section(path, HEADING, f"{HEADING}\n\nnewer\n")
    assert "new table" not in path.read_text() and "by hand" in path.read_text()
    assert path.read_text().count("## End-to-end") == 1


def test_a_new_file_gets_the_title(tmp_path: Path) -> None:
    path = tmp_path / "b.md"
    write_section(path, HEADING, f"{HEADING}\n\ntable\n")
    assert path.read_text() == f"{TITLE}\n\n{HEADING}\n\ntable\n"


def test_a_heading_that_only_starts_another_is_not_its_section(tmp_path: Path) -> None:
    path = tmp_path / "b.md"
    path.write_text(f"{TITLE}\n\n{HEADING} (older)\n\nkeep\n\n#{HEADING}\n\nkeep too\n")
    write_section(path, HEADING, f"{HEADING}\n\ntable\n")
    text = path.read_text()
    assert "keep\n" in text and "keep too" in text and text.endswith(f"{HEADING}\n\ntable\n")


def result(step: float, memory: float) -> dict[str, float]:
    return {"step_s": step, "peak_rss_mb": memory}


@pytest.mark.parametrize(
    ("ours", "expected"),
    [
        (result(3.2, 600), "step met (0.80x); memory met (0.60x)"),
        (result(3.84, 500), "step missed by 0.16 (0.96x, target <= 0.8x); memory met (0.50x)"),
        (result(2.0, 700), "step met (0.50x); memory missed by 0.10 (0.70x, target <= 0.6x)"),
    ],
)
def test_targets_say_met_or_by_how_much_missed(ours: dict[str, float], expected: str) -> None:
    assert run.targets(ours, result(4.0, 1000), None, "peak_rss_mb", checkpointing=False) == expected


def test_checkpointing_memory_is_against_peft_without_checkpointing() -> None:
    ours, peft_with, peft_without = result(5.0, 1100), result(5.0, 2100), result(4.0, 3400)
    assert run.targets(ours, peft_with, peft_without, "peak_rss_mb", checkpointing=True) == (
        "step missed by 0.20 (1.00x, target <= 0.8x); memory met (0.32x) of peft without checkpointing"
    )
    assert run.targets(ours, peft_with, None, "peak_rss_mb", checkpointing=True).endswith(
        "no peft row without checkpointing to compare with"
    )
    failed = {"impl": "peft", "error": "ValueError: no checkpointing"}
    assert run.targets(ours, failed, peft_without, "peak_rss_mb", checkpointing=True).startswith("step: not measured")


def git(folder: Path, *args: str) -> str:
    command = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_the_checkout_names_the_commit_and_changes_other_than_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sections, "HERE", tmp_path / "benchmarks")
    (tmp_path / "benchmarks").mkdir()
    assert sections.checkout() == ""  # not a git checkout
    git(tmp_path, "init", "-q")
    (tmp_path / "benchmarks" / "step.py").write_text("a\n")
    (tmp_path / "BENCHMARKS.md").write_text("# B\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "m")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert sections.checkout() == f"commit {head}"
    (tmp_path / "BENCHMARKS.md").write_text("# B\n\nwritten by a benchmark\n")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert sections.checkout() == f"commit {head}"
    (tmp_path / "benchmarks" / "step.py").write_text("b\n")
    assert sections.checkout() == f"commit {head} + uncommitted changes"


def test_a_checkpointing_row_is_judged_against_peft_without_checkpointing_in_the_same_table() -> None:
    rows: list[run.Row] = [
        ("lora", "fp32", False, result(4.0, 1750), result(4.1, 3430), [0.98]),
        ("lora", "bf16", False, result(2.0, 1300), result(2.7, 2270), [0.74]),
        ("lora", "fp32", True, result(5.2, 1100), result(5.0, 2100), [1.04]),
    ]
    lines = run.table(rows, "peak_rss_mb")
    assert len(lines) == 2 + len(rows) and all(line.count("|") == 11 for line in lines)
    assert lines[2].endswith("| step missed by 0.18 (0.98x, target <= 0.8x); memory met (0.51x) |")
    assert lines[3].startswith("| lora | bf16 | off | 2.00 | 2.70 | 0.74 | 1300 | 2270 | 0.57 |")
    assert lines[4].endswith("memory met (0.32x) of peft without checkpointing |")  # 1100 / 3430, not / 2100


def test_a_sections_note_is_the_commit_then_the_users_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sections, "checkout", lambda: "commit abc1234")
    assert sections.stamped("idle") == "commit abc1234, idle"
    assert sections.stamped("") == "commit abc1234"
    monkeypatch.setattr(sections, "checkout", lambda: "")  # outside git
    assert sections.stamped("idle") == "idle"

"""Resume skips a damaged newest checkpoint, says so, continues from the newest intact one, deletes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from petune.cli import main
from tests.test_damaged_files import DAMAGES, cut, flip
from tests.train.tiny import tiny_args, trained_tensors

NEWEST, OLDER = "step-00000003", "step-00000002"


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run that kept the checkpoints of steps 2 and 3."""
    run = tmp_path_factory.mktemp("resume") / "run"
    args = tiny_args(tiny_model_dir, tiny_data, run, "--save-every", "1", "--keep-checkpoints", "2")
    assert main([*args, "--eval-samples", "0"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [OLDER, NEWEST]
    return run


def resume(run: Path, tiny_model_dir: Path, tiny_data: tuple[Path, Path]) -> int:
    """Continue `run` to step 3: from step 2 nothing is saved again, so every folder stays as it was."""
    args = tiny_args(tiny_model_dir, tiny_data, run, "--save-every", "1", "--keep-checkpoints", "2")
    return main([*args, "--eval-samples", "0", "--max-steps", "3", "--resume"])


DAMAGED_FILES = {
    **{f"state-{name}": ("trainer_state.pt", DAMAGES[name]) for name in ("empty", "cut-9", "cut-half", "flip-0")},
    "state-flip-middle": ("trainer_state.pt", None),  # a changed number: only the checksum sees it
    "rng-cut-half": ("rng-rank0.pt", cut(0.5)),
    "adapter-flip-9": ("adapter_model.safetensors", flip(9)),
    "checksums-cut-half": ("checksums.json", cut(0.5)),
}


@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_a_damaged_newest_checkpoint_is_skipped(
    case: str,
    finished_run: Path,
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    name, damage = DAMAGED_FILES[case]
    target = run / "checkpoints" / NEWEST / name
    (damage or flip(target.stat().st_size // 2))(target)
    damaged_bytes = target.read_bytes()
    assert resume(run, tiny_model_dir, tiny_data) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {NEWEST} is damaged, skipping it" in out and name in out
    assert f"resuming from {run / 'checkpoints' / OLDER} (step 2)" in out
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == [f"damaged-{NEWEST}", OLDER]
    assert (run / "checkpoints" / f"damaged-{NEWEST}" / name).read_bytes() == damaged_bytes


def test_skipping_gives_the_weights_of_resuming_from_the_older_one(
    finished_run: Path, tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    damaged = Path(shutil.copytree(finished_run, tmp_path / "damaged"))
    cut(0.5)(damaged / "checkpoints" / NEWEST / "trainer_state.pt")
    reference = Path(shutil.copytree(finished_run, tmp_path / "reference"))
    shutil.rmtree(reference / "checkpoints" / NEWEST)
    assert resume(damaged, tiny_model_dir, tiny_data) == 0
    assert resume(reference, tiny_model_dir, tiny_data) == 0
    got, expected = trained_tensors(damaged), trained_tensors(reference)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_no_intact_checkpoint_starts_over_and_keeps_both(
    finished_run: Path,
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    for step in (OLDER, NEWEST):
        cut(0)(run / "checkpoints" / step / "trainer_state.pt")
    assert resume(run, tiny_model_dir, tiny_data) == 0
    out = capsys.readouterr().out
    assert "no intact checkpoint yet: starting from step 0" in out
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == [f"damaged-{OLDER}", f"damaged-{NEWEST}", "step-00000001", OLDER]


def test_old_checkpoints_without_checksums_are_still_checked(
    finished_run: Path,
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    for step in (OLDER, NEWEST):
        (run / "checkpoints" / step / "checksums.json").unlink()
    cut(0.5)(run / "checkpoints" / NEWEST / "trainer_state.pt")
    assert resume(run, tiny_model_dir, tiny_data) == 0
    assert f"resuming from {run / 'checkpoints' / OLDER} (step 2)" in capsys.readouterr().out

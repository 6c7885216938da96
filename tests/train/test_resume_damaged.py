"""Resume skips a damaged newest checkpoint, says so, continues from the newest intact one, deletes nothing."""

from __future__ import annotations

import shutil
from collections.abc import Callable
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


Damage = tuple[str, str, Callable[[Path], None]]  # (checkpoint folder, file in it, what is done to the file)


@pytest.fixture
def damaged_resume(
    finished_run: Path,
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[Path, str]]:
    """`damaged_resume(*damages, copy="run")`: a copy of the finished run, damaged, resumed: (the copy, its output)."""

    def run_with(*damages: Damage, copy: str = "run") -> tuple[Path, str]:
        run = Path(shutil.copytree(finished_run, tmp_path / copy))
        for step, name, damage in damages:
            damage(run / "checkpoints" / step / name)
        assert resume(run, tiny_model_dir, tiny_data) == 0
        return run, capsys.readouterr().out

    return run_with


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def flip_middle(path: Path) -> None:
    """A changed number inside the file: only the checksum sees it."""
    flip(path.stat().st_size // 2)(path)


DAMAGED_FILES = {
    **{f"state-{name}": ("trainer_state.pt", DAMAGES[name]) for name in ("empty", "cut-9", "cut-half", "flip-0")},
    "state-flip-middle": ("trainer_state.pt", flip_middle),
    "rng-cut-half": ("rng-rank0.pt", cut(0.5)),
    "adapter-flip-9": ("adapter_model.safetensors", flip(9)),
    "checksums-cut-half": ("checksums.json", cut(0.5)),
}


@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_a_damaged_newest_checkpoint_is_skipped(
    case: str, damaged_resume: Callable[..., tuple[Path, str]], finished_run: Path, tmp_path: Path
) -> None:
    name, damage = DAMAGED_FILES[case]
    run, out = damaged_resume((NEWEST, name, damage))
    assert f"checkpoint {NEWEST} is damaged, skipping it" in out and name in out
    assert f"resuming from {run / 'checkpoints' / OLDER} (step 2)" in out
    assert checkpoints(run) == [f"damaged-{NEWEST}", OLDER]
    damaged = Path(shutil.copy(finished_run / "checkpoints" / NEWEST / name, tmp_path / name))
    damage(damaged)  # the same damage again, on a copy of the intact file: the run kept the damaged file as it was
    assert (run / "checkpoints" / f"damaged-{NEWEST}" / name).read_bytes() == damaged.read_bytes()


def test_skipping_gives_the_weights_of_resuming_from_the_older_one(
    damaged_resume: Callable[..., tuple[Path, str]],
) -> None:
    damaged, _ = damaged_resume((NEWEST, "trainer_state.pt", cut(0.5)), copy="damaged")
    reference, _ = damaged_resume((NEWEST, ".", shutil.rmtree), copy="reference")  # as if never saved
    got, expected = trained_tensors(damaged), trained_tensors(reference)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_no_intact_checkpoint_starts_over_and_keeps_both(damaged_resume: Callable[..., tuple[Path, str]]) -> None:
    run, out = damaged_resume(*[(step, "trainer_state.pt", cut(0)) for step in (OLDER, NEWEST)])
    assert "no intact checkpoint yet: starting from step 0" in out
    assert checkpoints(run) == [f"damaged-{OLDER}", f"damaged-{NEWEST}", "step-00000001", OLDER]


def test_old_checkpoints_without_checksums_are_still_checked(damaged_resume: Callable[..., tuple[Path, str]]) -> None:
    unlink_checksums = [(step, "checksums.json", Path.unlink) for step in (OLDER, NEWEST)]
    run, out = damaged_resume(*unlink_checksums, (NEWEST, "trainer_state.pt", cut(0.5)))
    assert f"resuming from {run / 'checkpoints' / OLDER} (step 2)" in out

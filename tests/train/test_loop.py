"""The training loop: schedule, data order, accumulation, resume after SIGKILL, 2-process DDP."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from petune.cli import main
from petune.train.config import build_config
from petune.train.loop import lr_at, micro_batches
from tests.train.tiny import assert_every_weight_moved, tiny_args, trained_tensors

QUICK = ["--eval-samples", "0", "--eval-before", "false", "--lora.target-modules", "all-linear"]


def assert_same_tensors(a: Path, b: Path, atol: float) -> None:
    first, second = trained_tensors(a), trained_tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=0, msg=key)


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    assert_same_tensors(a, b, atol)
    assert any(t.abs().sum() > 0 for k, t in trained_tensors(a).items() if "lora_B" in k), "the adapter did not train"


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(schedule: str) -> None:
    cfg = build_config({"schedule": schedule, "max_steps": 10, "warmup_steps": 2})
    rates = [lr_at(step, cfg, 1.0) for step in range(10)]
    assert rates[0] < rates[1] < rates[2] == 1.0
    if schedule == "constant":
        assert rates[2:] == [1.0] * 8
    else:
        assert all(a > b for a, b in itertools.pairwise(rates[2:])) and rates[-1] > 0


def test_global_batch_is_the_same_however_it_is_split() -> None:
    one = build_config({"batch_size": 4, "grad_accum": 1})
    accumulated = build_config({"batch_size": 2, "grad_accum": 2})
    split = build_config({"batch_size": 2, "grad_accum": 1})
    for step in range(12):  # 48 examples from 10: crosses several epochs
        reference = sorted(itertools.chain(*micro_batches(step, 10, one, 1, 0)))
        assert sorted(itertools.chain(*micro_batches(step, 10, accumulated, 1, 0))) == reference
        both = micro_batches(step, 10, split, 2, 0)[0] + micro_batches(step, 10, split, 2, 1)[0]
        assert sorted(both) == reference
    pairs = build_config({"batch_size": 2})
    first_epoch = [i for step in range(4) for batch in micro_batches(step, 8, pairs, 1, 0) for i in batch]
    assert sorted(first_epoch) == list(range(8))  # each epoch is a permutation


def test_gradient_accumulation_equals_the_big_batch(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "big"), *QUICK]) == 0
    small = ["--batch-size", "2", "--grad-accum", "2"]
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "acc"), *QUICK, *small]) == 0
    assert_same_adapter(tmp_path / "big", tmp_path / "acc", atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_sigkill_reaches_the_same_weights(
    method: str, tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    # dropout > 0 so that the random state has to be restored too (LoRA; the tiny model itself has none)
    extra = [*QUICK, "--max-steps", "16", "--save-every", "2", "--keep-checkpoints", "3", "--lora.lora-dropout", "0.1"]
    extra += ["--method", method]
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "straight"), *extra]) == 0

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels as this process (one thread)
    args = [*tiny_args(tiny_model_dir, tiny_data, run), *extra]
    process = subprocess.Popen([sys.executable, "-m", "petune.cli", *args], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists() and not (run / "model").exists(), "the run finished before it was killed"
    assert main([*args, "--resume"]) == 0
    if method == "full":
        assert_same_tensors(tmp_path / "straight", run, atol=1e-6)
        assert_every_weight_moved(run, tiny_model_dir)
    else:
        assert_same_adapter(tmp_path / "straight", run, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(s for s in steps) == steps and steps.count(16) == 2  # each step logged once (+ final eval)
    assert len(list((run / "checkpoints").glob("step-*"))) <= 3


def test_resume_needs_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", "--output", str(tmp_path / "nothing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_two_processes_give_the_same_adapter_as_one(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "one"), *QUICK]) == 0  # global batch 4
    args = [*tiny_args(tiny_model_dir, tiny_data, tmp_path / "two"), *QUICK, "--batch-size", "2", "--nproc", "2"]
    result = subprocess.run([sys.executable, "-m", "petune.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("*/rng-rank*.pt"))[:2] == [
        "rng-rank0.pt",
        "rng-rank1.pt",
    ]


@pytest.mark.parametrize("fails", [False, True])
def test_every_run_leaves_its_process_group(
    fails: bool, tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Accelerator.end_training` (destroy_process_group) at the end of a run, also a failed one: a
    data-parallel process that exits inside its gloo group aborted now and then ("terminate called without
    an active exception", exit code 6, in about 1 of 6 two-process runs)."""
    import accelerate

    from petune.train import loop

    ended: list[int] = []
    monkeypatch.setattr(accelerate.Accelerator, "end_training", lambda self: ended.append(1))
    if fails:
        monkeypatch.setattr(loop, "train_steps", lambda run, start: (_ for _ in ()).throw(RuntimeError("boom")))
    args = [*tiny_args(tiny_model_dir, tiny_data, tmp_path / "run"), *QUICK, "--max-steps", "1"]
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            main(args)
    else:
        assert main(args) == 0
    assert ended == [1]

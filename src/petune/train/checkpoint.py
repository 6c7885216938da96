"""Checkpoints: everything needed to continue a run exactly, written so a crash never leaves half of one.

    <run>/checkpoints/step-00000040/
        adapter_config.json, adapter_model.safetensors   the adapter so far (HF PEFT format, usable as is);
            for --method full: config.json, model.safetensors, the whole model (a transformers folder)
        trainer_state.pt    trainable tensors, optimizer state, step, data position, strategy (plain tensors and dicts)
        rng-rank<R>.pt      each process's random number generator states
        deepspeed/ or fsdp/ under --strategy zero2/zero3/fsdp: the engine's own state (each process its shard
                            of the trained tensors and optimizer state); trainer_state.pt then holds the
                            gathered trained tensors and no optimizer state
        checksums.json      SHA-256 of each file above, so a file damaged later is noticed on resume

A checkpoint is written into a temporary folder and renamed into place (a rename is atomic), so a
`step-*` folder is always complete. Old checkpoints are renamed away before they are deleted.

Resume takes the newest checkpoint whose files are intact. Newer damaged ones (a disk that filled up, a
copy cut short) are reported and renamed to `damaged-step-*`, kept for the user, out of the way of the
next save and of pruning; an intact checkpoint is never deleted except by pruning after a newer save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from petune import PeftModel, files
from petune.files import FileError
from petune.train import UserError
from petune.train.engines import Engine

STATE_NAME = "trainer_state.pt"
CHECKSUMS_NAME = "checksums.json"
PREFIX = "step-"
DAMAGED_PREFIX = "damaged-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def saved(run_dir: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first."""
    found = [p for p in checkpoint_dir(run_dir).glob(f"{PREFIX}*") if p.name.removeprefix(PREFIX).isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = saved(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, engine: Engine, extra: dict[str, Any], rank: int, barrier: Any, keep: int) -> Path:
    """Write checkpoint `step` (every process calls this; process 0 writes the shared files)."""
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"
    tmp = checkpoint_dir(run_dir) / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    extra = {**extra, "strategy": engine.strategy, "processes": engine.world}
    with engine.gathered() as tensors:
        save_trained_tensors(engine, tensors, tmp, main=rank == 0)
        if rank == 0:
            optimizer = {} if engine.saves_state else engine.optimizer.state_dict()
            state = {"step": step, "trainable": {k: v.clone() for k, v in tensors.items()}, "optimizer": optimizer}
            torch.save({**state, **extra}, tmp / STATE_NAME)
    if engine.saves_state:
        engine.save(tmp)
    barrier()
    if rank == 0:
        _write_checksums(tmp)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        _prune(run_dir, keep)
    barrier()
    return final


def save_trained_tensors(engine: Engine, tensors: dict[str, torch.Tensor], folder: Path, main: bool) -> None:
    """The adapter (HF PEFT format), or a full run's model, from the gathered trained tensors; written by the
    `main` process. Every process calls it: a sharded engine's adapter is computed on each (a prompt method runs
    its encoder, a forward every ZeRO-3 process must take part in), as HF Trainer saves."""
    if engine.saves_state and isinstance(engine.model, PeftModel):
        engine.model.save_pretrained(folder, state_dict=tensors, is_main_process=main)
    elif main and engine.saves_state:  # the live parameters may be shards: the gathered tensors are what is saved
        engine.model.save_pretrained(folder, state_dict=tensors)  # type: ignore[operator]
    elif main:
        engine.model.save_pretrained(folder)  # type: ignore[operator]


def restore(run_dir: Path, engine: Engine, rank: int, barrier: Any, say: Any) -> tuple[Path | None, dict[str, Any]]:
    """Load the newest intact checkpoint into the model, optimizer and RNG: (its folder, its saved state).

    Damaged newer checkpoints are skipped, reported with `say`, and renamed (process 0) to `damaged-step-*`
    once every process has chosen. (None, {}) when there is no intact checkpoint.
    """
    damaged: list[Path] = []
    chosen: tuple[Path | None, dict[str, Any]] = (None, {})
    for path in reversed(saved(run_dir)):
        try:
            state, rng = read(path, rank)
        except FileError as error:
            damaged.append(path)
            say(f"checkpoint {path.name} is damaged, skipping it: {error}")
            continue
        apply(path, state, rng, engine)
        chosen = (path, state)
        break
    barrier()
    if rank == 0:
        for path in damaged:
            aside = _unused(path.with_name(f"{DAMAGED_PREFIX}{path.name}"))
            os.rename(path, aside)
            say(f"moved the damaged checkpoint to {aside} (nothing deleted)")
    barrier()
    return chosen


def read(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, this process's RNG state) of a checkpoint; a FileError when a file is damaged."""
    fix = "petune resumes from an older checkpoint when there is one"
    checksums = path / CHECKSUMS_NAME
    if checksums.is_file():  # checkpoints written before petune wrote checksums have none
        expected = files.read_json(checksums, "checkpoint checksum list", fix)
        for name, digest in expected.items():
            if files.sha256(files.require_file(path / name, "checkpoint file", fix)) != digest:
                raise files.FileError(
                    "checkpoint file", path / name, "differs from the checksum saved with it (damaged)", fix
                )
    state = files.load_torch(path / STATE_NAME, "trainer state", fix)
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise UserError(f"checkpoint {path} has no random state for process {rank}; resume with the same --nproc")
    rng = files.load_torch(rng_file, "random-generator state", fix)
    if not isinstance(state, dict) or not {"step", "trainable", "optimizer"} <= set(state):
        raise files.FileError(
            "trainer state", path / STATE_NAME, "lacks the step, trainable tensors or optimizer state", fix
        )
    return state, rng


def apply(path: Path, state: dict[str, Any], rng: dict[str, Any], engine: Engine) -> None:
    """Copy a checkpoint's trainable tensors, optimizer state and RNG state into this process."""
    saved_by = (state.get("strategy", "ddp"), state.get("processes", engine.world))
    if saved_by != (engine.strategy, engine.world) and (engine.saves_state or saved_by[0] != engine.strategy):
        raise UserError(
            f"checkpoint {path} was saved under --strategy {saved_by[0]} with {saved_by[1]} processes; "
            f"resume it with --strategy {saved_by[0]} --nproc {saved_by[1]}"
        )
    params = dict(engine.model.named_parameters())
    saved_tensors = state.pop("trainable")
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(saved_tensors) != expected:
        raise UserError(f"checkpoint {path} does not match this model and method (different trainable tensors)")
    if engine.saves_state:
        engine.load(path)
    else:
        with torch.no_grad():
            for name, tensor in saved_tensors.items():
                params[name].copy_(tensor)
        engine.optimizer.load_state_dict(state.pop("optimizer"))
    set_rng_state(rng)


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`... whichever does not exist yet."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def _write_checksums(folder: Path) -> None:
    """`checksums.json`: the SHA-256 of every file of a checkpoint folder (adapter, state, RNG states, engine)."""
    found = sorted(child for child in folder.rglob("*") if child.is_file())
    digests = {child.relative_to(folder).as_posix(): files.sha256(child) for child in found}
    (folder / CHECKSUMS_NAME).write_text(json.dumps(digests, indent=1) + "\n")


def _prune(run_dir: Path, keep: int) -> None:
    for old in saved(run_dir)[:-keep]:
        doomed = old.with_name(f".old-{old.name}")
        os.rename(old, doomed)  # never leave a half-deleted step-* folder behind
        shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's files and entry to disk, so the rename publishes complete data."""
    for child in path.rglob("*"):
        if child.is_file():
            with child.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

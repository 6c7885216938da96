"""Checkpoints: everything needed to continue a run exactly, written so a crash never leaves half of one.

    <run>/checkpoints/step-00000040/
        adapter_config.json, adapter_model.safetensors   the adapter so far (HF PEFT format, usable as is);
            for --method full: config.json, model.safetensors, the whole model (a transformers folder)
        trainer_state.pt    trainable tensors, optimizer state, step, data position (plain tensors and dicts)
        rng-rank<R>.pt      each process's random number generator states

A checkpoint is written into a temporary folder and renamed into place (a rename is atomic), so a
`step-*` folder is always complete. Old checkpoints are renamed away before they are deleted.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petune.train import UserError

STATE_NAME = "trainer_state.pt"
PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = sorted(checkpoint_dir(run_dir).glob(f"{PREFIX}*"), key=lambda p: int(p.name.removeprefix(PREFIX)))
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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train, by parameter name (exactly what the optimizer updates)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def save(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    rank: int,
    barrier: Any,
    keep: int,
) -> Path:
    """Write checkpoint `step` (every process calls this; process 0 writes the shared files)."""
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"
    tmp = checkpoint_dir(run_dir) / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        model.save_pretrained(tmp)
        state = {"step": step, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(), **extra}
        torch.save(state, tmp / STATE_NAME)
    barrier()
    if rank == 0:
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        _prune(run_dir, keep)
    barrier()
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Restore the trainable tensors, optimizer and this process's RNG; return the saved state (step, ...)."""
    state: dict[str, Any] = torch.load(path / STATE_NAME, weights_only=True)
    params = dict(model.named_parameters())
    saved = state.pop("trainable")
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        raise UserError(f"checkpoint {path} does not match this model and method (different trainable tensors)")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state.pop("optimizer"))
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise UserError(f"checkpoint {path} has no random state for process {rank}; resume with the same --nproc")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _prune(run_dir: Path, keep: int) -> None:
    found = sorted(checkpoint_dir(run_dir).glob(f"{PREFIX}*"), key=lambda p: int(p.name.removeprefix(PREFIX)))
    for old in found[:-keep]:
        doomed = old.with_name(f".old-{old.name}")
        os.rename(old, doomed)  # never leave a half-deleted step-* folder behind
        shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's files and entry to disk, so the rename publishes complete data."""
    for child in path.iterdir():
        if child.is_file():
            with child.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

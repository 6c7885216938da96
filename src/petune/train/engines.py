"""What differs between the `--strategy` engines, behind one small interface the loop and checkpoints use.

    micro_batch(last)   the block one micro-batch's forward and backward run in (gradient sync on the last)
    backward(loss)      backward of a loss whose gradient, averaged over processes, is the global-batch sum
    step(max_norm, after)  clip, optimizer step, `after()` (gradients still in place), zero the gradients;
                        returns the gradient norm before clipping
    gathered()          a block in which every process holds each trained tensor whole; yields them by name
    save(folder) / load(folder)   the engine's own model + optimizer state (sharded engines only)

DDP keeps today's loop (torch's clipping and AdamW step; checkpoint.py saves the optimizer's state dict).
DeepSpeed runs backward, clipping and the step inside its engine and saves with `save_checkpoint`
(trained tensors only). FSDP2 syncs gradients on the last micro-batch, clips DTensors and saves through
torch.distributed.checkpoint (trained tensors and their optimizer state, each process its shard).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from petune.train.strategy import is_deepspeed, zero3_gathering


class Engine:
    """DDP, or a single process: the model replicated, gradients averaged by DistributedDataParallel."""

    saves_state = False  # checkpoint.py saves the optimizer's state dict itself

    def __init__(
        self, strategy: str, accelerator: Accelerator, model: nn.Module, optimizer: Any, grad_accum: int
    ) -> None:
        self.strategy, self.accelerator, self.model, self.grad_accum = strategy, accelerator, model, grad_accum
        self.world = accelerator.num_processes
        self.trained, self.optimizer = self.prepare(model, optimizer)

    def prepare(self, model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        if self.world == 1:
            return model, optimizer
        # DDP broadcasts every parameter from process 0 when it wraps the model (in 250 MB buckets it copies
        # into, and then into the weights of the other processes: +1.0 GB a process on SmolLM2 on CPU) and
        # reduces the gradients of those that train. Frozen ones have no gradient and every process loaded
        # them from the same file: DDP leaves them alone (the trained tensors are still broadcast).
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return self.accelerator.prepare(model), optimizer

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.trained)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, max_norm: float, after: Callable[[], None] = lambda: None) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params(), max_norm)
        self.optimizer.step()
        after()
        self.optimizer.zero_grad(set_to_none=True)
        return float(_whole(norm))

    @contextlib.contextmanager
    def gathered(self) -> Iterator[dict[str, torch.Tensor]]:
        yield {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    def forward_only_done(self) -> None:
        """After a forward with no backward to follow (a check before training): release what it gathered."""

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError


class DeepSpeed(Engine):
    """ZeRO-2/3 through accelerate's DeepSpeedPlugin; `trained` is the DeepSpeedEngine."""

    saves_state = True
    TAG = "deepspeed"

    def prepare(self, model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        if self.strategy == "zero3":  # how much ZeRO-3 keeps gathered, from the model's layer size
            zero = self.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
            for key, value in zero3_gathering(model).items():
                zero.setdefault(key, value)
        trained, optimizer = self.accelerator.prepare(model, optimizer)
        return trained, optimizer

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed counts micro-batches to its accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        self.trained.backward(loss * self.grad_accum)  # type: ignore[operator]  # it divides by the accumulation
        self.trained.step()  # type: ignore[operator]  # a real step only at the accumulation boundary

    def step(self, max_norm: float, after: Callable[[], None] = lambda: None) -> float:
        after()  # gradients already gone: strategy.py keeps methods that read them (AdaLoRA) off DeepSpeed
        norm = self.trained.get_global_grad_norm()  # type: ignore[operator]  # clipped by `gradient_clipping`
        return float(_whole(norm)) if norm is not None else 0.0

    @contextlib.contextmanager
    def gathered(self) -> Iterator[dict[str, torch.Tensor]]:
        import deepspeed

        trained = [p for p in self.model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trained):  # ZeRO-3: whole on every process; ZeRO-2: a no-op
            yield {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def save(self, folder: Path) -> None:
        self.trained.save_checkpoint(  # type: ignore[operator]
            str(folder), tag=self.TAG, client_state={}, save_latest=False, exclude_frozen_parameters=True
        )

    def load(self, folder: Path) -> None:
        path, _ = self.trained.load_checkpoint(  # type: ignore[operator]
            str(folder), tag=self.TAG, load_module_strict=False, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / self.TAG}")


class Fsdp(Engine):
    """FSDP2 through accelerate's plugin: `fully_shard` per decoder layer and at the root (the model itself)."""

    saves_state = True
    FOLDER = "fsdp"

    def prepare(self, model: nn.Module, optimizer: Any) -> tuple[nn.Module, Any]:
        with _deepspeed_unseen():
            trained, optimizer = self.accelerator.prepare(model, optimizer)
        return trained, optimizer

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        self.trained.set_requires_gradient_sync(last)  # type: ignore[operator]
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[dict[str, torch.Tensor]]:
        """The root's own parameters unsharded (a prompt method's encoder lives there, and its saved tensors
        are computed by running it); the layers' trained tensors gathered one by one."""
        tensors = {name: _whole(p.detach()) for name, p in self.model.named_parameters() if p.requires_grad}
        self.trained.unshard()  # type: ignore[operator]
        try:
            yield tensors
        finally:
            self.trained.reshard()  # type: ignore[operator]

    def forward_only_done(self) -> None:
        """FSDP2 leaves the root's parameters and those of any unit it does not reshard after forward (the
        embedding's) unsharded until the backward: a forward with no backward would keep them whole."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.trained.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _state(self) -> tuple[dict[str, Any], Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        model_state, optim_state = get_state_dict(
            self.trained, optimizer, options=StateDictOptions(ignore_frozen_params=True)
        )
        return {"model": model_state, "optimizer": optim_state}, optimizer

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state()[0], checkpoint_id=folder / self.FOLDER)

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state, optimizer = self._state()
        dcp.load(state, checkpoint_id=folder / self.FOLDER)
        set_state_dict(
            self.trained,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),  # the frozen base is not saved
        )


@contextlib.contextmanager
def _deepspeed_unseen() -> Iterator[None]:
    """While accelerate prepares an FSDP2 model, it does not import DeepSpeed. Its `extract_model_from_parallel`
    (called on the model first) imports DeepSpeed whenever it is installed, to unwrap a `DeepSpeedEngine`, which
    an FSDP2 model never is: on a CPU that import kept +146 MiB in each process for the rest of the run (SmolLM2,
    2 processes: 75 MiB of library pages, 71 anonymous; BENCHMARKS.md, issue 18). A no-op once DeepSpeed is in."""
    from accelerate.utils import other

    available = getattr(other, "is_deepspeed_available", None)
    if "deepspeed" in sys.modules or available is None:  # nothing to save, or an accelerate that looks elsewhere
        yield
        return
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = available


def frozen_bytes(model: nn.Module) -> tuple[int, int]:
    """(held by this process, whole) bytes of the frozen parameters. A process holds a ZeRO-3 partition
    (`ds_tensor`), an FSDP2 shard (the DTensor's local part) or, replicated, the whole tensor."""
    held = whole = 0
    for param in model.parameters():
        if param.requires_grad:
            continue
        local = getattr(param, "ds_tensor", None)
        if local is None:
            local = param.to_local() if hasattr(param, "to_local") else param
        held += local.numel() * local.element_size()
        whole += getattr(param, "ds_numel", param.numel()) * param.element_size()
    return held, whole


def _whole(tensor: Any) -> Any:
    """A DTensor (FSDP2's sharded parameters and norms) gathered into a plain tensor; anything else as is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def make_engine(strategy: str, accelerator: Accelerator, model: nn.Module, optimizer: Any, grad_accum: int) -> Engine:
    """The engine of `strategy`, with the model and optimizer prepared (wrapped or sharded) by accelerate."""
    kind = DeepSpeed if is_deepspeed(strategy) else Fsdp if strategy == "fsdp" else Engine
    return kind(strategy, accelerator, model, optimizer, grad_accum)

"""Adapter layers: a base layer plus named adapters, the one place that keeps per-adapter bookkeeping.

Every module petune puts into a model is an `AdapterLayer`: the original module lives on as
`base_layer`, the adapters as `adapters[name]`. That single convention gives the file format for free
(strip `adapters.<name>.` from a parameter's name and you have HF PEFT's key) and lets the wrapper
switch, disable, delete and mix adapters without knowing which method made them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

BASE_ADAPTER = "__base__"  # the name that selects "no adapter" for a row of a mixed batch

# Per-row adapter names for the batch being run, set by `batch_adapters`; None means "use the active one".
_batch_adapter_names: ContextVar[Sequence[str] | None] = ContextVar("petune_batch_adapters", default=None)


@contextlib.contextmanager
def batch_adapters(names: Sequence[str] | None) -> Iterator[None]:
    """Within the block, row i of every batch goes through adapter `names[i]` (`"__base__"`: none)."""
    token = _batch_adapter_names.set(list(names) if names is not None else None)
    try:
        yield
    finally:
        _batch_adapter_names.reset(token)


class AdapterLayer(nn.Module):
    """A module wrapped with named adapters; subclasses define `forward_adapter`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The output for input `x` through adapter `name` (None: the base layer alone)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = _batch_adapter_names.get()
        if names is None:
            return self.forward_adapter(self.active_adapter, x, *args, **kwargs)
        return self._forward_mixed(names, x, *args, **kwargs)

    def _forward_mixed(self, names: Sequence[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch = x.shape[0]
        if batch % len(names):
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch} rows")
        # generate() with beams or several return sequences repeats each row in place.
        repeat = batch // len(names)
        row_names = [name for name in names for _ in range(repeat)]
        out: torch.Tensor | None = None
        for name in dict.fromkeys(row_names):
            rows = torch.tensor([i for i, n in enumerate(row_names) if n == name], device=x.device)
            # A layer the named adapter does not touch gives the base output for its rows.
            adapter = name if name in self.adapters else None
            y = self.forward_adapter(adapter, x[rows], *args, **kwargs)
            if out is None:
                out = y.new_empty((batch, *y.shape[1:]))
            out[rows] = y
        assert out is not None
        return out

    def set_active(self, name: str | None) -> None:
        """Route plain forward calls through `name`; None (or a name this layer lacks) means the base layer."""
        self.active_adapter = name if name is not None and name in self.adapters else None

    def delete(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None


class ModulesToSave(AdapterLayer):
    """A full trainable copy of a module per adapter (HF PEFT's `modules_to_save`, e.g. a classifier head)."""

    def add(self, name: str) -> None:
        self.adapters[name] = copy.deepcopy(self.base_layer)

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.base_layer if name is None else self.adapters[name]
        return module(x, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        # Code that reads e.g. `model.score.weight` keeps working.
        try:
            return super().__getattr__(attr)
        except AttributeError:
            return getattr(self.base_layer, attr)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer in `model`, with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

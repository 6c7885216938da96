"""The LN tuning layer: a frozen module plus one trainable copy of it per adapter."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from petune.layers import AdapterLayer


class TunedCopy(nn.Module):
    """One adapter: `ln_tuning_layers`, a trainable copy of the base module (HF PEFT's file key)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base_layer)


class LNTuningLayer(AdapterLayer):
    """Runs the active adapter's copy of the module instead of the module.

    Merging swaps that copy in as the base module (the original is kept to swap back): one adapter at
    a time, as in HF PEFT, since copies of one module cannot be combined.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: list[str] = []

    def add(self, name: str) -> None:
        self.adapters[name] = TunedCopy(self.base_layer)

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged and name not in self.merged:
            raise RuntimeError(
                f"adapter {self.merged[0]!r} is merged into the model; call unmerge_adapter() before running "
                f"with {'no adapter' if name is None else repr(name)}"
            )
        module = self.base_layer
        if name is not None and not self.merged:
            adapter: TunedCopy = self.adapters[name]  # type: ignore[assignment]
            module = adapter.ln_tuning_layers
        output: torch.Tensor = module(x, *args, **kwargs)
        return output

    def merge(self, name: str, safe_merge: bool) -> None:
        if self.merged:
            raise ValueError(f"LN tuning merges one adapter at a time: {self.merged[0]!r} is merged; unmerge it first")
        if safe_merge:
            for param in self.adapters[name].parameters():
                if not torch.isfinite(param).all():
                    raise ValueError(f"merging adapter {name!r} would put NaN or inf into the weights; not merged")
        self._swap(name)
        self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self._swap(self.merged.pop())

    def _swap(self, name: str) -> None:
        adapter: TunedCopy = self.adapters[name]  # type: ignore[assignment]
        self.base_layer, adapter.ln_tuning_layers = adapter.ln_tuning_layers, self.base_layer

"""The (IA)^3 layer: a frozen linear layer whose output (or, feed-forward, input) is rescaled by a vector."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petune.methods.weight_layer import WeightLayer


class IA3Vector(nn.Module):
    """One adapter's vector `ia3_l`: (out, 1) rescales the output, (1, in) the input (`feedforward`).

    The shapes are HF PEFT's, so the file holds the same tensors. Kept in float32 whatever the base dtype.
    """

    def __init__(self, in_features: int, out_features: int, feedforward: bool, init: bool) -> None:
        super().__init__()
        self.feedforward = feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape) if init else torch.randn(shape))


class IA3Layer(WeightLayer):
    """Wraps `nn.Linear` or GPT-2's `Conv1D`: y = l * (W x + b), or for a feed-forward layer y = W (l * x) + b."""

    def add(self, name: str, feedforward: bool, init: bool) -> None:
        adapter = IA3Vector(self.in_features, self.out_features, feedforward, init)
        self.adapters[name] = adapter.to(self.base_layer.weight.device)  # type: ignore[arg-type]

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.check_merged(name) or name is None:
            return self.base_layer(x, *args, **kwargs)
        adapter: IA3Vector = self.adapters[name]  # type: ignore[assignment]
        scale = adapter.ia3_l.flatten()
        if adapter.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    @torch.no_grad()
    def merge(self, name: str, safe_merge: bool) -> None:
        """W <- W diag(l) (feed-forward), or W <- diag(l) W and b <- l * b."""
        weight, bias = self._scaled(name, lambda t, s: t * s)
        self.write_merged(name, weight, safe_merge, *([] if bias is None else [bias]))
        self._write_bias(bias)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (dividing by l), most recent first."""
        while self.merged:
            weight, bias = self._scaled(self.merged.pop(), lambda t, s: t / s)
            self._set_base_weight(weight)
            self._write_bias(bias)

    def _scaled(self, name: str, op: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight (out, in) and bias after applying `op(tensor, l)` along the scaled dimension."""
        adapter: IA3Vector = self.adapters[name]  # type: ignore[assignment]
        scale = adapter.ia3_l.float()
        weight = op(self.base_weight().float(), scale)
        bias: torch.Tensor | None = getattr(self.base_layer, "bias", None)
        if bias is not None and not adapter.feedforward:
            bias = op(bias.float(), scale.flatten())
        return weight, bias

    def _write_bias(self, bias: torch.Tensor | None) -> None:
        base_bias: torch.Tensor | None = getattr(self.base_layer, "bias", None)
        if bias is not None and base_bias is not None:
            base_bias.data.copy_(bias.to(base_bias.dtype))

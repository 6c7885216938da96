"""Layers whose adapters change a linear weight: the base-weight access and merge bookkeeping they share.

`WeightLayer` wraps `nn.Linear` (bitsandbytes' 4-bit layers included) or GPT-2's `Conv1D` and gives its
subclasses the frozen weight as (out, in) whatever the storage, a way to overwrite it, and the rule that
a merged layer only runs the merged adapter. `DeltaLayer` is the additive case: adapter `name` adds
`delta_weight()` (out, in) to the weight (LoHa, LoKr, VeRA), in forward or, merged, into the weight itself.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petune.layers import AdapterLayer
from petune.quantization import dequantize_4bit, is_4bit


class WeightLayer(AdapterLayer):
    """Wraps `nn.Linear` or `Conv1D` (whose weight is stored transposed, `fan_in_fan_out`)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        partitioned = getattr(self.base_layer.weight, "ds_shape", None)  # DeepSpeed ZeRO-3: the weight is a shard
        if partitioned is not None:
            shape = tuple(reversed(partitioned)) if fan_in_fan_out else tuple(partitioned)
        else:
            shape = tuple(self.base_weight().shape)
        self.out_features, self.in_features = shape
        self.merged: list[str] = []

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in), dequantised if the base layer is 4-bit."""
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        if is_4bit(weight):
            weight = dequantize_4bit(weight)
        return weight.T if self.fan_in_fan_out else weight

    def whole_base_weight(self) -> contextlib.AbstractContextManager[Any]:
        """A block in which `base_weight()` is whole: DeepSpeed ZeRO-3 keeps it partitioned outside the base
        layer's own forward, so it is gathered on every process (read only); a no-op otherwise."""
        weight = self.base_layer.weight
        if not hasattr(weight, "ds_id"):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight])

    def use_base_weight_in_forward(self) -> None:
        """This layer's forward reads `base_weight()` beyond the base layer's forward: under ZeRO-3 the weight is
        registered as an external parameter of this layer, so that DeepSpeed gathers it for this layer's forward
        and backward (and frees it after); a no-op otherwise."""
        weight = self.base_layer.weight
        if hasattr(weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, weight)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Overwrite the frozen weight with `weight` (out, in), in the base layer's storage and dtype."""
        target: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        if is_4bit(target):
            self._dequantise_base_layer()
            target = self.base_layer.weight  # type: ignore[assignment]
        target.data.copy_((weight.T if self.fan_in_fan_out else weight).to(target.dtype))

    def _dequantise_base_layer(self) -> None:
        """Swap a 4-bit base layer for a dense one in its compute dtype, so a merge is exact.

        Re-quantising a merged weight to 4 bits would add an error as large as the update itself (NF4
        steps are ~1/16 of a block's range), so petune keeps the merged layer dense and says so.
        """
        base = self.base_layer
        dtype = getattr(base, "compute_dtype", None) or torch.bfloat16
        bias: torch.Tensor | None = getattr(base, "bias", None)
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype)
        dense.to(base.weight.device)  # type: ignore[arg-type]
        with torch.no_grad():
            dense.weight.copy_(self.base_weight().to(dtype))
            if bias is not None:
                dense.bias.copy_(bias.to(dtype))
        dense.requires_grad_(False)
        warnings.warn(
            f"merging into a 4-bit layer: dequantised it to a dense {dtype} layer (not re-quantised)", stacklevel=5
        )
        self.base_layer = dense

    def write_merged(self, name: str, weight: torch.Tensor, safe_merge: bool, *others: torch.Tensor) -> None:
        """Store merged weight (out, in) of adapter `name`; `safe_merge` first refuses NaN or inf (in `others` too)."""
        if safe_merge:
            check_finite(name, weight, *others)
        self._set_base_weight(weight)
        self.merged.append(name)

    def check_merged(self, name: str | None) -> bool:
        """True when adapters are merged (then only the merged one may run: an error otherwise)."""
        if not self.merged:
            return False
        if name not in self.merged:
            raise RuntimeError(
                f"adapters {self.merged} are merged into the weights; call unmerge_adapter() before "
                f"running with {'no adapter' if name is None else repr(name)}"
            )
        return True


def check_finite(name: str, *tensors: torch.Tensor) -> None:
    """`safe_merge`'s check: refuse a merge that would put NaN or inf into the weights."""
    if not all(torch.isfinite(t).all() for t in tensors):
        raise ValueError(f"merging adapter {name!r} would put NaN or inf into the weights; not merged")


class DeltaLayer(WeightLayer):
    """Adapter `name` adds `adapters[name].delta_weight()`, shape (out, in), to the frozen weight.

    An adapter module computes its own output from `x` (`adapter(x)`, e.g. without forming the
    (out, in) matrix); merging adds its `delta_weight()` to the weight and unmerging subtracts it.
    """

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.check_merged(name) or name is None:
            return result
        update: torch.Tensor = self.adapters[name](x)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self, name: str, safe_merge: bool) -> None:
        """W <- W + delta_weight."""
        delta = self.adapters[name].delta_weight()  # type: ignore[operator]
        self.write_merged(name, self.base_weight().float() + delta.float(), safe_merge)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`, most recent first."""
        while self.merged:
            delta = self.adapters[self.merged.pop()].delta_weight()  # type: ignore[operator]
            self._set_base_weight(self.base_weight().float() - delta.float())


def linear_update(x: torch.Tensor, delta_weight: torch.Tensor) -> torch.Tensor:
    """x delta^T in the adapter's dtype: x (..., in), delta (out, in) -> (..., out)."""
    return F.linear(x.to(delta_weight.dtype), delta_weight)

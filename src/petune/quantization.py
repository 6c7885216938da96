"""bitsandbytes 4-bit bases (QLoRA, Dettmers et al. 2023): the two things petune must handle itself.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place into a layout for its inference
kernel the first time the layer runs in eval mode without gradients. Two things then go wrong:
`dequantize_4bit` reads only the standard layout (so a merge or DoRA's weight norm would use garbage),
and no gradient flows back through a repacked layer (so adapters below it stop learning). petune
undoes the repacking when it wraps a model and turns it off, and dequantises through the inverse.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def is_4bit(weight: Any) -> bool:
    return weight.__class__.__name__ == "Params4bit"


def dequantize_4bit(weight: Any) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as a dense (out, in) tensor in its compute dtype (the weight is unchanged)."""
    import bitsandbytes.functional as bnb_functional

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    dense: torch.Tensor = bnb_functional.dequantize_4bit(data, state)
    return dense


def keep_4bit_layers_trainable(model: nn.Module) -> None:
    """Put every repacked 4-bit weight back in the standard layout and stop bitsandbytes repacking it."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not is_4bit(weight):
            continue
        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # type: ignore[union-attr]
            import bitsandbytes.functional as bnb_functional

            weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(  # type: ignore[union-attr]
                weight.data,  # type: ignore[union-attr]
                weight.quant_state,  # type: ignore[union-attr]
            )
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010

"""`PatchedForward`: what `petune.kernels.enable` puts on a module instance as its own `forward`."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class PatchedForward:
    """A module's replacement forward, kept on the instance (`module.forward`) so the class stays stock.

    `layer` is the decoder layer around the module. While that layer runs under gradient checkpointing the
    kernels step aside: only one layer's activations are alive at a time there, so they saved nothing
    (SmolLM2 fp32 4 x 256: 1125 MB peak with them, 1128 MB without, glibc's mmap threshold fixed), and with
    glibc's default heap their changed allocation pattern measured 50-90 MB more peak RSS (fragmentation)."""

    def __init__(self, module: nn.Module, layer: nn.Module) -> None:
        self.module = module
        self.layer = layer

    def checkpointing(self) -> bool:
        """Whether the enclosing layer recomputes its forward in backward (transformers' own condition)."""
        return bool(getattr(self.layer, "gradient_checkpointing", False)) and self.layer.training

    def __deepcopy__(self, memo: dict[int, Any]) -> PatchedForward:
        """A copy of the module (LN tuning's trainable copy, `modules_to_save`) gets a forward of its own, bound
        to the copy; its layer is the copied layer when the whole layer or model is copied, else the original
        one (the copy runs inside it). Copying `layer` here would copy the whole decoder layer along with
        every patched module: LN tuning held 60 stray layer copies (+1.1 GB for SmolLM2)."""
        clone = copy.copy(self)
        clone.module = copy.deepcopy(self.module, memo)
        clone.layer = memo.get(id(self.layer), self.layer)
        return clone

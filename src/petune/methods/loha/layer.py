"""The LoHa adapter: two low-rank factor pairs combined by an element-wise (Hadamard) product."""

from __future__ import annotations

import torch
from torch import nn

from petune.methods.loha.config import LoHaConfig
from petune.methods.lycoris import LycorisAdapter, kaiming_
from petune.methods.weight_layer import DeltaLayer


class LoHaAdapter(LycorisAdapter):
    """`hada_w1_a`, `hada_w2_a` (out, r) and `hada_w1_b`, `hada_w2_b` (r, in): HF PEFT's names and shapes."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, config: LoHaConfig) -> None:
        super().__init__(r, alpha, config)
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features))
        kaiming_(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b)

    def product(self) -> torch.Tensor:
        """(W1a W1b) * (W2a W2b), shape (out, in)."""
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)


class LoHaLayer(DeltaLayer):
    """An `nn.Linear` with LoHa adapters."""

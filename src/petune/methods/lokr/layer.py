"""The LoKr adapter: delta_W = (alpha / r) W1 kron W2, each factor full or a rank-r product."""

from __future__ import annotations

import torch
from torch import nn

from petune.factors import factorization
from petune.methods.lokr.config import LoKrConfig
from petune.methods.lycoris import LycorisAdapter, kaiming_
from petune.methods.weight_layer import DeltaLayer


class LoKrAdapter(LycorisAdapter):
    """Factors under HF PEFT's names: `lokr_w1` (a, b) or `lokr_w1_a` (a, r) `lokr_w1_b` (r, b); likewise W2
    (c, d) as `lokr_w2` or `lokr_w2_a` (c, r) `lokr_w2_b` (r, d)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, config: LoKrConfig) -> None:
        super().__init__(r, alpha, config)
        self.rescale_rank_dropout = config.rank_dropout_scale
        out_a, out_c = factorization(out_features, config.decompose_factor)
        in_b, in_d = factorization(in_features, config.decompose_factor)
        full_w1 = not (config.decompose_both and r < max(out_a, in_b) / 2)
        full_w2 = not r < max(out_c, in_d) / 2
        self.w1_names = self._factor("lokr_w1", out_a, in_b, r, full_w1)
        self.w2_names = self._factor("lokr_w2", out_c, in_d, r, full_w2)
        init = config.init_weights
        kaiming_(*self.parameters())
        if init is True:
            nn.init.zeros_(getattr(self, self.w1_names[0]))  # W1 (or its left factor) zero: delta_W = 0
        elif init == "lycoris":
            nn.init.zeros_(getattr(self, self.w2_names[-1]))  # W2 (or its right factor) zero

    def _factor(self, name: str, rows: int, cols: int, r: int, full: bool) -> list[str]:
        """Register factor `name` as one (rows, cols) matrix or as `name_a` (rows, r) @ `name_b` (r, cols)."""
        shapes = {name: (rows, cols)} if full else {f"{name}_a": (rows, r), f"{name}_b": (r, cols)}
        for key, shape in shapes.items():
            self.register_parameter(key, nn.Parameter(torch.empty(shape)))
        return list(shapes)

    def product(self) -> torch.Tensor:
        """W1 kron W2, shape (a c, b d) = (out, in)."""
        w1, w2 = (self._matrix(names) for names in (self.w1_names, self.w2_names))
        return torch.kron(w1, w2)

    def _matrix(self, names: list[str]) -> torch.Tensor:
        factors = [getattr(self, name) for name in names]
        return factors[0] if len(factors) == 1 else factors[0] @ factors[1]


class LoKrLayer(DeltaLayer):
    """An `nn.Linear` with LoKr adapters."""

"""The AdaLoRA layer: an SVD-shaped low-rank update P diag(lambda) Q whose singular values can be masked."""

from __future__ import annotations

import torch
from torch import nn

from petune.methods.adalora.config import AdaLoraConfig
from petune.methods.weight_layer import DeltaLayer


class SVDAdapter(nn.Module):
    """`lora_A` = Q (r, in), `lora_E` = lambda (r, 1), `lora_B` = P (out, r) (HF PEFT's names and shapes).

    The update is scaled by `scaling / ranknum`: lora_alpha over the rank the layer started with (init_r), kept
    when ranks are pruned so the kept triplets mean what they meant in training. `ranknum` is a buffer, not
    saved (HF PEFT does not save it either).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, config: AdaLoraConfig) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, in_features))
        self.lora_E = nn.Parameter(torch.randn(rank, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, rank))
        if config.init_lora_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("ranknum", torch.tensor([float(config.init_r)]), persistent=False)
        self.scaling = float(config.lora_alpha) if config.lora_alpha > 0 else float(rank)
        dropout = config.lora_dropout
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def scaled(self, update: torch.Tensor) -> torch.Tensor:
        """update * scaling / ranknum (HF PEFT's order of operations, so results agree to the last bit)."""
        ranknum: torch.Tensor = self.ranknum  # type: ignore[assignment]
        return update * self.scaling / (ranknum + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        """P diag(lambda) Q * scale, shape (out, in)."""
        return self.scaled(self.lora_B @ (self.lora_A * self.lora_E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Q^T diag(lambda) P^T * scale, (..., out)."""
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        return self.scaled(x @ (self.lora_A * self.lora_E).T @ self.lora_B.T)


class AdaLoraLayer(DeltaLayer):
    """An `nn.Linear` or `Conv1D` with AdaLoRA adapters."""

    def add(self, name: str, rank: int, config: AdaLoraConfig) -> None:
        adapter = SVDAdapter(self.in_features, self.out_features, rank, config)
        self.adapters[name] = adapter.to(self.base_weight().device)

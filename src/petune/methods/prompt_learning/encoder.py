"""`VirtualTokenEncoder`: the trained module of a prompt method, from its parameters to V virtual tokens.

Each method's encoder is a table `embedding` (V rows) optionally followed by a reparameterisation (P-tuning's
MLP or LSTM, prefix tuning's projection). Its output, one row per virtual token, is what HF PEFT saves as
`prompt_embeddings`. The submodule names are HF PEFT's (`embedding`, `mlp_head`, `lstm_head`, `transform`), so
the extra tensors petune saves to resume training read `prompt_encoder.mlp_head.0.weight` and so on.
"""

from __future__ import annotations

import torch
from torch import nn


class VirtualTokenEncoder(nn.Module):
    """`embedding.weight` (V, in_dim) -> `encode` -> (V, out_dim) virtual tokens.

    Subclasses set `embedding` and, when they reparameterise it, override `encode`.
    """

    embedding: nn.Embedding

    def __init__(self) -> None:
        super().__init__()
        self.reparameterized = False  # True while `encode` is more than the identity

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(V, in_dim) -> (V, out_dim); the identity unless a subclass reparameterises."""
        return embeddings

    def forward(self) -> torch.Tensor:
        """The virtual tokens, (V, out_dim); in the encoder's dtype (float32 unless converted)."""
        return self.encode(self.embedding.weight) if self.reparameterized else self.embedding.weight

    def outputs(self) -> torch.Tensor:
        """The virtual tokens as a detached tensor, computed in eval mode (no dropout): what is saved."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self().detach().float()
        finally:
            self.train(was_training)

    def hold_outputs(self, outputs: torch.Tensor) -> None:
        """Become a plain table holding `outputs` (V, out_dim), dropping any reparameterisation.

        Used when a file has `prompt_embeddings` but no encoder weights (e.g. one written by HF PEFT):
        the same virtual tokens come out, and training continues on them directly.
        """
        requires_grad = self.embedding.weight.requires_grad
        for child in [name for name in self._modules if name != "embedding"]:
            delattr(self, child)
        weight = outputs.detach().to(device=self.embedding.weight.device, dtype=self.embedding.weight.dtype)
        self.embedding = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)
        self.embedding.weight.requires_grad_(requires_grad)
        self.reparameterized = False

    def extra_repr(self) -> str:
        return f"reparameterized={self.reparameterized}"

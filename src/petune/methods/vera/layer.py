"""The VeRA layer: shared frozen random A, B and per-layer trained scaling vectors d, b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from petune.methods.vera.config import VeraConfig
from petune.methods.weight_layer import DeltaLayer


class VeraProjection(nn.Module):
    """The frozen random matrices every layer of one adapter shares: A (r, max in), B (max out, r).

    Drawn Kaiming-uniform (gain sqrt(2), bound sqrt(6 / fan_in)) from a CPU generator seeded with
    `projection_prng_key`, A first, as HF PEFT does, so a file without them (`save_projection=False`)
    regenerates the same matrices. Buffers: they move with the model but never train.
    """

    def __init__(self, r: int, max_out: int, max_in: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vera_a = nn.init.kaiming_uniform_(torch.empty(r, max_in), nonlinearity="relu", generator=generator)
        vera_b = nn.init.kaiming_uniform_(torch.empty(max_out, r), nonlinearity="relu", generator=generator)
        self.register_buffer("vera_A", vera_a)
        self.register_buffer("vera_B", vera_b)


class VeraAdapter(nn.Module):
    """One layer's trained vectors `vera_lambda_b` (out,) and `vera_lambda_d` (r,) (HF PEFT's names)."""

    def __init__(self, in_features: int, out_features: int, projection: VeraProjection, config: VeraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._projection = (projection,)  # shared, owned by the PeftModel: not registered here
        r = config.r
        init = config.init_weights
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features) if init else torch.ones(out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(config.d_initial)) if init else torch.randn(r))
        dropout = config.vera_dropout
        self.vera_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:, :in] (r, in) and B[:out] (out, r): this layer's share of the shared matrices."""
        a, b = self._projection[0].vera_A, self._projection[0].vera_B
        return a[:, : self.in_features], b[: self.out_features]  # type: ignore[index]

    def delta_weight(self) -> torch.Tensor:
        """diag(b) B diag(d) A, shape (out, in)."""
        a, b = self.sliced()
        return (self.vera_lambda_b.unsqueeze(1) * b) @ (self.vera_lambda_d.unsqueeze(1) * a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """b * B (d * A x), (..., out), without forming the (out, in) matrix."""
        a, b = self.sliced()
        x = self.vera_dropout(x.to(self.vera_lambda_d.dtype))
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)


class VeraLayer(DeltaLayer):
    """An `nn.Linear` or `Conv1D` with VeRA adapters."""

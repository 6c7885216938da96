"""The FourierFT adapter: trained coefficients at fixed random entries of the update's 2-D spectrum."""

from __future__ import annotations

import torch
from torch import nn

from petune.methods.weight_layer import DeltaLayer, linear_update


class FourierFTAdapter(nn.Module):
    """`fourierft_spectrum` (n,) (HF PEFT's name), at the entries `indices` (2, n) of an (out, in) spectrum."""

    def __init__(self, in_features: int, out_features: int, n: int, scaling: float, seed: int, init: bool) -> None:
        super().__init__()
        self.shape = (out_features, in_features)
        self.scaling = scaling
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(out_features * in_features, generator=generator)[:n]
        self.register_buffer("indices", torch.stack([flat // in_features, flat % in_features]), persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n) if init else torch.randn(n))

    def delta_weight(self) -> torch.Tensor:
        """scaling * Re(IDFT2(F)), shape (out, in); the FFT runs in float32 (it has no bf16 kernel)."""
        spectrum = self.fourierft_spectrum
        dense = torch.zeros(self.shape, device=spectrum.device, dtype=torch.float32)
        indices: torch.Tensor = self.indices  # type: ignore[assignment]
        dense[indices[0], indices[1]] = spectrum.float()
        return (torch.fft.ifft2(dense).real * self.scaling).to(spectrum.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_update(x, self.delta_weight())


class FourierFTLayer(DeltaLayer):
    """An `nn.Linear` or `Conv1D` with FourierFT adapters."""

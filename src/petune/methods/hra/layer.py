"""The HRA layer: a frozen linear layer whose weight is multiplied by an orthogonal chain of reflections."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petune.methods.weight_layer import WeightLayer


class HRAAdapter(nn.Module):
    """One adapter's reflection vectors `hra_u` (in, r), HF PEFT's name and shape."""

    def __init__(self, in_features: int, r: int, apply_gs: bool, init: bool) -> None:
        super().__init__()
        self.apply_gs = apply_gs
        self.hra_u = nn.Parameter(torch.empty(in_features, r))
        if init and apply_gs:
            warnings.warn(
                "HRA with apply_GS=True and init_weights=True: Gram-Schmidt on the equal pairs of vectors leaves "
                "rounding noise (as in HF PEFT), so the model does not start unchanged and training is unstable; "
                "use apply_GS=False or init_weights=False",
                stacklevel=5,
            )
        if init and r % 2 == 0:
            half = torch.empty(in_features, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            with torch.no_grad():
                self.hra_u.copy_(half.repeat_interleave(2, dim=1))  # u_1 = u_2, u_3 = u_4, ...: H = I
        else:
            if init:
                warnings.warn(
                    f"HRA with an odd r={r} cannot start as the identity; its vectors start random", stacklevel=5
                )
            nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    def rotation(self) -> torch.Tensor:
        """H (in, in): H_1 H_2 ... H_r, or with Gram-Schmidt I - 2 U U^T for the orthonormalised U."""
        u = self.hra_u
        eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
        if self.apply_gs:
            q = orthonormal_columns(u)
            return eye - 2 * q @ q.T
        u = u / u.norm(dim=0)
        h = eye
        for i in range(u.shape[1]):
            column = u[:, i : i + 1]
            h = h - 2 * (h @ column) @ column.T  # h <- h (I - 2 u u^T)
        return h


def orthonormal_columns(u: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of `u` (in, r), in order: (in, r) with orthonormal columns."""
    columns: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        column = u[:, i : i + 1]
        for previous in columns:
            column = column - (previous.T @ column) * previous
        columns.append(column / column.norm())
    return torch.cat(columns, dim=1)


class HRALayer(WeightLayer):
    """An `nn.Linear` whose weight W becomes W H: y = x (W H)^T + b."""

    def add(self, name: str, r: int, apply_gs: bool, init: bool) -> None:
        adapter = HRAAdapter(self.in_features, r, apply_gs, init)
        self.adapters[name] = adapter.to(self.base_layer.weight.device)  # type: ignore[arg-type]

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.check_merged(name) or name is None:
            return self.base_layer(x, *args, **kwargs)
        adapter: HRAAdapter = self.adapters[name]  # type: ignore[assignment]
        rotation = adapter.rotation()
        weight = self.base_weight().to(rotation.dtype) @ rotation
        bias: torch.Tensor | None = getattr(self.base_layer, "bias", None)
        bias = None if bias is None else bias.to(rotation.dtype)
        return F.linear(x.to(rotation.dtype), weight, bias).to(x.dtype)

    @torch.no_grad()
    def merge(self, name: str, safe_merge: bool) -> None:
        """W <- W H."""
        rotation = self.adapters[name].rotation()  # type: ignore[operator]
        self.write_merged(name, self.base_weight().float() @ rotation.float(), safe_merge)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W H^T (H is orthogonal), most recent first."""
        while self.merged:
            rotation = self.adapters[self.merged.pop()].rotation()  # type: ignore[operator]
            self._set_base_weight(self.base_weight().float() @ rotation.float().T)

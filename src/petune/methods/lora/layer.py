"""The LoRA layer: a frozen linear layer plus low-rank updates (LoRA, rsLoRA, DoRA)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petune.methods.lora.project_down import project_down
from petune.methods.weight_layer import WeightLayer


class LoraAdapter(nn.Module):
    """One adapter's tensors: A (r, in), B (out, r), and DoRA's magnitude (out,).

    Adapter weights are kept in float32 whatever the base dtype: the update is tiny, and bf16 rounding
    of A and B would swamp it (QLoRA, Dettmers et al. 2023, section 3).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        dora: bool,
    ) -> None:
        super().__init__()
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        if dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features))

    def delta_weight(self) -> torch.Tensor:
        """s B A, shape (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)


class LoraLayer(WeightLayer):
    """Wraps `nn.Linear` or GPT-2's `Conv1D` (whose weight is stored transposed, `fan_in_fan_out`)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self._merged_dora_norms: dict[str, torch.Tensor] = {}

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool, init: Any) -> None:
        adapter = LoraAdapter(self.in_features, self.out_features, r, alpha, dropout, rslora, dora)
        adapter.to(self.base_layer.weight.device)  # type: ignore[arg-type]
        self.adapters[name] = adapter
        with torch.no_grad():
            self._init_weights(adapter, init)
            if adapter.lora_magnitude_vector is not None:
                with self.whole_base_weight():
                    adapter.lora_magnitude_vector.copy_(self._dora_weight_norm(adapter))
                self.use_base_weight_in_forward()  # DoRA's norm, every forward

    def _init_weights(self, adapter: LoraAdapter, init: Any) -> None:
        if init is False:
            return  # nn.Linear's own random init for both: the adapter changes the output from step 0
        if isinstance(init, str) and init.startswith("pissa"):
            self._init_pissa(adapter, init)
            return
        if init == "gaussian":
            nn.init.normal_(adapter.lora_A.weight, std=1 / adapter.r)
        else:
            nn.init.kaiming_uniform_(adapter.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(adapter.lora_B.weight)

    def _init_pissa(self, adapter: LoraAdapter, init: str) -> None:
        """PiSSA (Meng et al. 2024): B A holds the top-r singular directions of W, the base keeps the rest."""
        weight = self.base_weight().float()
        r = adapter.r
        if init == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            niter = int(init.removeprefix("pissa_niter_"))
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
            vh = v.T
        s = s / adapter.scaling
        adapter.lora_A.weight.copy_(torch.diag(s.sqrt()) @ vh)
        adapter.lora_B.weight.copy_(u @ torch.diag(s.sqrt()))
        residual = weight - adapter.delta_weight()
        self._set_base_weight(residual)

    def _dora_weight_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        """||W + s B A|| per output row, shape (out,); DoRA treats it as a constant (section 4.3)."""
        weight = self.base_weight().to(adapter.lora_A.weight.dtype)
        return torch.linalg.vector_norm(weight + adapter.delta_weight(), dim=1)

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if self.check_merged(name) or name is None:
            return result
        adapter: LoraAdapter = self.adapters[name]  # type: ignore[assignment]
        if adapter.lora_magnitude_vector is None and isinstance(adapter.lora_dropout, nn.Identity):
            lora_out = adapter.lora_B(project_down(x, adapter.lora_A.weight))  # keeps x, not an fp32 copy
            return result + (adapter.scaling * lora_out).to(result.dtype)
        x_lora = adapter.lora_dropout(x.to(adapter.lora_A.weight.dtype))
        lora_out = adapter.lora_B(adapter.lora_A(x_lora))
        if adapter.lora_magnitude_vector is None:
            return result + (adapter.scaling * lora_out).to(result.dtype)
        # DoRA: m * (W + sBA) x / ||W + sBA||, written as a correction on top of the base output.
        weight = self.base_weight().to(x_lora.dtype)
        norm_scale = adapter.lora_magnitude_vector / self._dora_weight_norm(adapter).detach()
        if isinstance(adapter.lora_dropout, nn.Identity):
            bias: torch.Tensor | None = getattr(self.base_layer, "bias", None)
            base_out = (result - bias if bias is not None else result).to(x_lora.dtype)
        else:
            base_out = F.linear(x_lora, weight)
        dora_out = (norm_scale - 1) * base_out + norm_scale * adapter.scaling * lora_out
        return result + dora_out.to(result.dtype)

    @torch.no_grad()
    def merge(self, name: str, safe_merge: bool) -> None:
        """Fold adapter `name` into the base weight: W <- W + s B A (DoRA: m (W + s B A) / ||W + s B A||)."""
        adapter: LoraAdapter = self.adapters[name]  # type: ignore[assignment]
        weight = self.base_weight().float()
        merged = weight + adapter.delta_weight().float()
        if adapter.lora_magnitude_vector is not None:
            norm = torch.linalg.vector_norm(merged, dim=1)
            self._merged_dora_norms[name] = norm
            merged = merged * (adapter.lora_magnitude_vector.float() / norm).unsqueeze(1)
        self.write_merged(name, merged, safe_merge)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`, most recent first."""
        while self.merged:
            name = self.merged.pop()
            adapter: LoraAdapter = self.adapters[name]  # type: ignore[assignment]
            weight = self.base_weight().float()
            if adapter.lora_magnitude_vector is not None:
                norm = self._merged_dora_norms.pop(name)
                weight = weight * (norm / adapter.lora_magnitude_vector.float()).unsqueeze(1)
            self._set_base_weight(weight - adapter.delta_weight().float())

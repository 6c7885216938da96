"""RMSNorm with a frozen weight that keeps one N x H tensor and the per-row 1/rms for backward.

transformers' RMSNorm (LlamaRMSNorm and the many classes copied from it) computes

    x32 = x.float();  rstd = rsqrt(mean(x32^2) + eps);  y = weight * (x32 * rstd).to(x.dtype)

and autograd keeps the fp32 copy `x32` (twice the input's bytes in bf16) and `rstd`. The gradient needs
far less: with n = x32 * rstd and g_n = (grad_y * weight) rounded as the forward rounds n,

    grad_x = rstd * (g_n - n * mean(g_n * n))

so `RMSNormFunction` keeps the input in its own dtype (or, in fp32, the output y, from which n = y / weight:
adapters on the projections it feeds keep that same tensor as their input, so it costs nothing extra) and
`rstd` (4 bytes a row). The forward runs transformers' own operations in the same order, so outputs are bit-identical,
except in bf16 on a CPU: there the forward and the gradient above each run as one C loop over each row
(`native.py`), the forward rounding as transformers does, its sum of squares added in another order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petune.kernels import native
from petune.kernels.base import PatchedForward


class RMSNormFunction(torch.autograd.Function):
    """`weight * rms_normalise(x)` for a weight that does not train; gradients for `x` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, keep_output: bool) -> torch.Tensor:
        ctx.input_dtype = x.dtype
        ctx.keep_output = keep_output
        if not keep_output and native.applies(x, weight):  # bf16 on a CPU: one C loop (native.py)
            y, rstd = native.rms_norm(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        normed = (x32 * rstd).to(x.dtype)
        # weight * normed, in place when the dtypes allow (a product is the same either way round)
        y = normed.mul_(weight) if torch.result_type(weight, normed) == normed.dtype else weight * normed
        ctx.save_for_backward(y if keep_output else x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        kept, weight, rstd = ctx.saved_tensors
        if not ctx.keep_output and native.applies(kept, weight, grad_y):  # bf16 on a CPU: one C loop (native.py)
            return native.rms_norm_input_gradient(grad_y, kept, weight, rstd), None, None, None
        # The forward rounded n to the input dtype before the product with the weight; so does the gradient.
        grad_n = (grad_y * weight).to(ctx.input_dtype).to(torch.float32)
        normed = kept / weight if ctx.keep_output else torch.mul(kept, rstd)  # n = x32 * rstd, in fp32
        # In place from here: on CPU a fresh tensor's page faults cost more than the arithmetic.
        product = grad_n * normed
        mean = product.mean(-1, keepdim=True)
        grad_x = grad_n.sub_(torch.mul(normed, mean, out=product)).mul_(rstd)
        return grad_x.to(ctx.input_dtype), None, None, None


class RMSNormForward(PatchedForward):
    """The replacement forward of one RMSNorm module; falls back to the class's own forward when the weight
    trains, no gradient is being recorded or the layer is checkpointed."""

    def __init__(self, module: nn.Module, layer: nn.Module) -> None:
        super().__init__(module, layer)
        self._weight_key: tuple[int, int] | None = None  # (storage, version) of the weight last checked
        self._weight_nonzero = False

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        module = self.module
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        grad = torch.is_grad_enabled() and hidden_states.requires_grad
        if weight.requires_grad or not grad or self.checkpointing():
            return type(module).forward(module, hidden_states)
        eps = float(module.variance_epsilon)  # type: ignore[arg-type]
        out: torch.Tensor = RMSNormFunction.apply(hidden_states, weight, eps, self._can_keep_output(hidden_states))
        return out

    def _can_keep_output(self, hidden_states: torch.Tensor) -> bool:
        """In fp32, keeping y instead of x costs the same, and nothing when an adapter keeps y anyway; it needs
        n = y / weight, so a weight without zeros. Checked once per change of the weight (its version
        counter moves with every in-place write), so no device sync per call."""
        weight: torch.Tensor = self.module.weight  # type: ignore[assignment]
        if hidden_states.dtype != torch.float32 or weight.dtype != torch.float32:
            return False
        key = (weight.untyped_storage().data_ptr(), weight._version)
        if key != self._weight_key:
            self._weight_nonzero = bool((weight != 0).all())
            self._weight_key = key
        return self._weight_nonzero

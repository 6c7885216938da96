"""`project_down`: x A^T for a LoRA adapter whose fp32 A meets a bf16 (or fp16) input.

Upcasting x and calling `lora_A` makes autograd keep the fp32 copy of x for A's gradient: one copy per
adapted layer, although q_proj, k_proj and v_proj (and gate_proj, up_proj) read the same x. This function
computes the same product but keeps x itself, in its own dtype, and upcasts it again in backward: half the
bytes, and one tensor for all the adapters that share an input. Under autocast the cast copy of A is not
kept either. Outputs are bit-identical to `lora_A(x.float())` and gradients equal to rounding
(tests/methods/lora/test_project_down.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _ProjectDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # what each gradient needs: x for the weight's, the weight for x's (as autograd's own linear does)
        ctx.dtypes = x.dtype, weight.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        x_dtype, weight_dtype = ctx.dtypes
        grad = grad.to(weight_dtype)  # bf16 when the forward ran under autocast; the backward runs without it
        grad_x = (grad @ weight).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            flat_grad = grad.reshape(-1, grad.shape[-1])
            grad_weight = flat_grad.T @ x.reshape(-1, x.shape[-1]).to(weight_dtype)
        return grad_x, grad_weight


def project_down(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x.to(weight.dtype), weight)`, keeping `x` (not its upcast copy) for the backward."""
    if x.dtype == weight.dtype or not torch.is_grad_enabled():
        return F.linear(x.to(weight.dtype), weight)
    out: torch.Tensor = _ProjectDown.apply(x, weight)
    return out

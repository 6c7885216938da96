"""The gated MLP's `silu(gate) * up` keeping only `gate` and `up` for backward.

Autograd keeps three N x I tensors for `act_fn(gate_proj(x)) * up_proj(x)`: gate (for SiLU's gradient),
silu(gate) and up (for the product's). `SwiGLUFunction` keeps gate and up and recomputes silu(gate) in
backward, an elementwise pass that costs far less than the memory it saves (Shazeer 2020, "GLU Variants
Improve Transformer", defines the layer). The gradients are computed with the same operations autograd
would use, so they are bit-identical, except in bf16 on a CPU, where both come from one C loop in fp32
(`native.py`), equal to autograd's to bf16 rounding. There the forward is one C loop too, rounding twice as
torch's silu-then-multiply does, without silu(gate)'s temporary (its exp is not torch's: 0.06% of elements a bf16
unit apart).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petune.kernels import native
from petune.kernels.base import PatchedForward


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, both (..., I)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        if native.applies(gate, up):  # bf16 on a CPU: one C loop (native.py)
            return native.swiglu(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        if native.applies(gate, up, grad):  # bf16 on a CPU: both in one C loop (native.py)
            both = native.swiglu_gradients(grad, gate, up)
            return (both[0] if ctx.needs_input_grad[0] else None), (both[1] if ctx.needs_input_grad[1] else None)
        grad_gate = grad_up = None
        # In place where possible: on CPU a fresh tensor's page faults cost more than the arithmetic.
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            grad_silu = grad * up
            grad_gate = torch.ops.aten.silu_backward.grad_input(grad_silu, gate, grad_input=grad_silu)
        return grad_gate, grad_up


def is_silu(module: nn.Module) -> bool:
    """True for torch's `nn.SiLU` and transformers' `SiLUActivation` (what `hidden_act="silu"` builds)."""
    return type(module).__name__ in ("SiLU", "SiLUActivation")


class SwiGLUMLPForward(PatchedForward):
    """The replacement forward of one LlamaMLP-like module: `down_proj(silu(gate_proj(x)) * up_proj(x))`.

    The three projections are called as they are, so plain frozen linears and petune's adapter layers
    (LoRA on all-linear) both work; only the product in between changes."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        act_fn = module.get_submodule("act_fn")
        if not is_silu(act_fn) or self.checkpointing():
            return type(module).forward(module, x)
        gate, up = module.get_submodule("gate_proj")(x), module.get_submodule("up_proj")(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad) and gate.dtype == up.dtype:
            hidden = SwiGLUFunction.apply(gate, up)
        else:
            hidden = act_fn(gate) * up
        out: torch.Tensor = module.get_submodule("down_proj")(hidden)
        return out

"""The kernels' elementwise backward passes fused into one loop each, with `torch.compile`, for bf16 on a CPU:
opt-in, `PETUNE_COMPILE=1`.

RMSNorm's and SwiGLU's input gradients are a dozen elementwise operations and row means; run one at a time,
each reads and writes the whole (tokens x width) tensor, and in bf16 each converts to and from fp32 on the way.
`torch.compile` (inductor, which writes and compiles C++ for a CPU) turns each gradient into one or two loops
over the data. Measured (`python benchmarks/fused_backward.py`, SmolLM2's widths at 4 x 256 tokens, 2 cores
with AMX; BENCHMARKS.md): RMSNorm's backward 4.0x and SwiGLU's 1.9x faster than op by op.

Only the backward passes: the forwards stay the eager operations transformers runs, so outputs stay
bit-identical to the stock modules; gradients are the same math in fp32 and equal the eager ones to rounding
(tests/kernels/test_fused.py). The first backward compiles, for any number of tokens (sizes symbolic), and inductor
keeps the result on disk for later processes: `benchmarks/fused_backward.py --repeats 1` takes 16.7 s with an
empty inductor cache and 6.5 s with a filled one (2 cores). Importing and running the compiler
costs resident memory too: 43-104 MB more peak on SmolLM2's library path, where the step gets 3-7% faster
(BENCHMARKS.md). That is why it is off unless asked for: on the small models a CPU trains, memory is the
scarcer of the two. Where compiling is impossible (no C++ compiler, an unsupported platform) the first failure is
reported once as a warning and the eager operations run from then on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

DTYPES = (torch.bfloat16,)

_failed: list[str] = []  # the first compile error, once one happened: eager from then on


def enabled() -> bool:
    """Whether fused backward passes may run: the environment sets `PETUNE_COMPILE=1` and compiling has not
    failed in this process."""
    on = os.environ.get("PETUNE_COMPILE", "0").strip().lower() in ("1", "true", "yes", "on")
    return on and not _failed


def applies(tensor: torch.Tensor) -> bool:
    """Whether a backward pass over `tensor` runs fused: a CPU tensor in one of `DTYPES`, compiling asked for."""
    return tensor.device.type == "cpu" and tensor.dtype in DTYPES and enabled()


class Fused:
    """`fn` compiled on its first call, for callers that checked `applies`; where compiling fails, `fn` as is
    (for this call: later ones see `applies` false and run the callers' own eager code)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)  # any token count, one compile
            return self.compiled(*args)
        except Exception as error:  # any compiler failure: run eager, say so once
            _failed.append(f"{type(error).__name__}: {error}".splitlines()[0])
            warnings.warn(
                f"petune: compiling the kernels' backward passes failed ({_failed[0]}); running them "
                "uncompiled (unset PETUNE_COMPILE to skip compiling)",
                RuntimeWarning,
                stacklevel=2,
            )
        return self.fn(*args)


def rms_norm_input_gradient(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """d loss / d x of `weight * rms_normalise(x)` (see rms_norm.py), in fp32, returned in x's dtype."""
    grad_n = (grad_y * weight).to(x.dtype).float()  # the forward rounded n to x's dtype before the weight
    normed = x.float() * rstd
    mean = (grad_n * normed).mean(-1, keepdim=True)
    return ((grad_n - normed * mean) * rstd).to(x.dtype)


def swiglu_gradients(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d gate, d loss / d up) of `silu(gate) * up`, in fp32, returned in gate's dtype."""
    gate32, grad32 = gate.float(), grad.float()
    sigmoid = torch.sigmoid(gate32)
    grad_up = grad32 * gate32 * sigmoid
    grad_gate = grad32 * up.float() * sigmoid * (1 + gate32 * (1 - sigmoid))
    return grad_gate.to(gate.dtype), grad_up.to(gate.dtype)


fused_rms_norm_input_gradient = Fused(rms_norm_input_gradient)
fused_swiglu_gradients = Fused(swiglu_gradients)

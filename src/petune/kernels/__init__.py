"""Memory-saving replacements for a frozen base model's RMSNorm and SwiGLU, on by default in `PeftModel`.

Autograd keeps, per decoder layer, what each small operation needs for its own gradient: RMSNorm's fp32 copy
of its input, and for the gated MLP gate, silu(gate) and up. The custom autograd functions here keep only
what the gradient of the whole block needs and recompute the cheap elementwise rest in backward:

    RMSNorm   the input in its own dtype (fp32: the output, which adapters after it keep anyway) and 1/rms
    SwiGLU    gate and up, not silu(gate)

Outputs are bit-identical to transformers'; input gradients equal them to rounding (tests/kernels).

`enable(model)` patches instances, never classes: a recognised module gets a `forward` attribute of its
own, which `disable(model)` deletes again, leaving stock transformers modules. A norm whose weight trains,
and any call without gradients (generation, evaluation), runs the class's own forward. The functions keep
no state between calls, so gradient checkpointing (reentrant or not) recomputes them like any operation.

`PeftModel` enables them on its base model unless the environment sets `PETUNE_KERNELS=0`; `unload()`
and `merge_and_unload()` disable them, so the model they return is stock.
"""

from __future__ import annotations

import os

from torch import nn

from petune.kernels.rms_norm import RMSNormForward, RMSNormFunction
from petune.kernels.swiglu import SwiGLUFunction, SwiGLUMLPForward, is_silu

__all__ = ["RMSNormFunction", "SwiGLUFunction", "disable", "enable", "enabled_by_default", "is_enabled"]

# transformers families whose RMSNorm and MLP forwards are, line for line, LlamaRMSNorm's and LlamaMLP's
# (tests/kernels/test_patch.py checks that against the installed transformers). Family -> (norm, MLP or None).
FAMILIES: dict[str, tuple[str, str | None]] = {
    "llama": ("LlamaRMSNorm", "LlamaMLP"),
    "mistral": ("MistralRMSNorm", "MistralMLP"),
    "ministral": ("MinistralRMSNorm", "MinistralMLP"),
    "mixtral": ("MixtralRMSNorm", None),  # experts are fused tensors, not an MLP module
    "qwen2": ("Qwen2RMSNorm", "Qwen2MLP"),
    "qwen2_moe": ("Qwen2MoeRMSNorm", "Qwen2MoeMLP"),
    "qwen3": ("Qwen3RMSNorm", "Qwen3MLP"),
    "qwen3_moe": ("Qwen3MoeRMSNorm", "Qwen3MoeMLP"),
    "phi3": ("Phi3RMSNorm", None),  # one fused gate_up_proj
    "granite": ("GraniteRMSNorm", "GraniteMLP"),
    "smollm3": ("SmolLM3RMSNorm", "SmolLM3MLP"),
}
_NORMS = {(f"transformers.models.{family}.modeling_{family}", norm) for family, (norm, _) in FAMILIES.items()}
_MLPS = {(f"transformers.models.{family}.modeling_{family}", mlp) for family, (_, mlp) in FAMILIES.items() if mlp}
_FORWARDS = (RMSNormForward, SwiGLUMLPForward)


def enabled_by_default() -> bool:
    """Whether `PeftModel` enables the kernels: yes unless the environment sets `PETUNE_KERNELS=0`."""
    return os.environ.get("PETUNE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _kind(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def enable(model: nn.Module) -> int:
    """Give every recognised RMSNorm and SiLU-gated MLP in `model` its memory-saving forward; returns how
    many modules were patched (0 for an architecture petune does not recognise). Idempotent."""
    patched = 0
    for module in model.modules():
        if "forward" in vars(module):
            continue  # patched already, or someone else's instance-level forward: leave it
        if _kind(module) in _NORMS:
            module.forward = RMSNormForward(module)
        elif _kind(module) in _MLPS and is_silu(module.get_submodule("act_fn")):
            module.forward = SwiGLUMLPForward(module)
        else:
            continue
        patched += 1
    return patched


def disable(model: nn.Module) -> int:
    """Undo `enable`: every patched module runs its class's forward again; returns how many were restored."""
    restored = 0
    for module in model.modules():
        if isinstance(vars(module).get("forward"), _FORWARDS):
            del module.forward
            restored += 1
    return restored


def is_enabled(model: nn.Module) -> bool:
    """Whether any module of `model` runs one of the kernels' forwards."""
    return any(isinstance(vars(module).get("forward"), _FORWARDS) for module in model.modules())

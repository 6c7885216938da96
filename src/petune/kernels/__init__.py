"""Memory-saving replacements for a frozen base model's RMSNorm and SwiGLU, and a faster causal attention for
bf16 training on a CPU (`attention.py`, which trades memory for time: see there), on by default in `PeftModel`.

Autograd keeps, per decoder layer, what each small operation needs for its own gradient: RMSNorm's fp32 copy
of its input, and for the gated MLP gate, silu(gate) and up. The custom autograd functions here keep only
what the gradient of the whole block needs and recompute the cheap elementwise rest in backward:

    RMSNorm   the input in its own dtype (fp32: the output, which adapters after it keep anyway) and 1/rms
    SwiGLU    gate and up, not silu(gate)

Outputs are bit-identical to transformers'; input gradients equal them to rounding (tests/kernels). In bf16 on
a CPU both passes of each, and the loss's softmax (`petune.loss`), run as C loops (`native.py`, built on first
use; `PETUNE_NATIVE=0` runs them op by op): there outputs equal transformers' to bf16 rounding (RMSNorm's sum of
squares adds in another order; almost every element is bit for bit).

`enable(model)` patches instances, never classes: a recognised module inside a decoder layer gets a
`forward` attribute of its own, which `disable(model)` deletes again, leaving stock transformers modules; a
model on transformers' "sdpa" attention is switched to `attention.KERNEL_ATTENTION` and back. A
norm whose weight trains, any call without gradients (generation, evaluation) and any decoder layer under
gradient checkpointing (where they save nothing: see `PatchedForward`) run the class's own forward. The
functions keep no state between calls, so they are safe to recompute (reentrant or not).

`PeftModel` enables them on its base model unless the environment sets `PETUNE_KERNELS=0`; `unload()`
and `merge_and_unload()` disable them, so the model they return is stock.

Measured (SmolLM2-135M, LoRA r8 q,v, batch 4 x 256, AdamW, 2 CPU cores, fresh process per run, medians):
autograd keeps 27% less per layer in fp32 (23.1 vs 31.6 kB a token) and 25% less in bf16 (16.2 vs 21.6 kB);
peak RSS fp32 2722 vs 2846 MB (4 runs each; 1728 vs 1974 MB with glibc's mmap threshold fixed, where heap
fragmentation does not hide the saving), bf16 1680 vs 1898 MB (3 runs); step time fp32 -3% (4.17 vs
4.31 s, 8 alternating steps in one process), bf16 unchanged (3.08 vs 3.04 s).
"""

from __future__ import annotations

import os

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from petune.kernels.attention import KERNEL_ATTENTION, switch_attention
from petune.kernels.base import PatchedForward
from petune.kernels.rms_norm import RMSNormForward, RMSNormFunction
from petune.kernels.swiglu import SwiGLUFunction, SwiGLUMLPForward, is_silu

__all__ = [
    "RMSNormFunction",
    "SwiGLUFunction",
    "disable",
    "enable",
    "enabled_by_default",
    "is_enabled",
    "patched_forwards",
    "restore",
]

# transformers families whose RMSNorm and MLP forwards are, line for line, LlamaRMSNorm's and LlamaMLP's
# (tests/kernels/test_families.py checks that against the installed transformers). Family -> (norm, MLP or None).
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


def enabled_by_default() -> bool:
    """Whether `PeftModel` enables the kernels: yes unless the environment sets `PETUNE_KERNELS=0`."""
    return os.environ.get("PETUNE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _kind(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def enable(model: nn.Module) -> int:
    """Give every recognised RMSNorm and SiLU-gated MLP inside `model`'s decoder layers its memory-saving
    forward; returns how many modules were patched (0 for an architecture petune does not recognise).
    Idempotent."""
    switch_attention(model, "sdpa", KERNEL_ATTENTION)
    # The innermost decoder layer around each module (modules() lists outer modules first). Only modules inside
    # one are patched: the final norm would save ~nothing (one norm of 2L + 1) and, measured, it shifted glibc's
    # heap fragmentation by +50-80 MB of peak RSS under gradient checkpointing.
    layers = {
        id(m): layer
        for layer in model.modules()
        if isinstance(layer, GradientCheckpointingLayer)
        for m in layer.modules()
    }
    patched = 0
    for module in model.modules():
        if "forward" in vars(module):
            continue  # patched already, or someone else's instance-level forward: leave it
        layer = layers.get(id(module))
        if layer is None:
            continue
        if _kind(module) in _NORMS:
            module.forward = RMSNormForward(module, layer)
        elif _kind(module) in _MLPS and is_silu(module.get_submodule("act_fn")):
            module.forward = SwiGLUMLPForward(module, layer)
        else:
            continue
        patched += 1
    return patched


def disable(model: nn.Module) -> int:
    """Undo `enable`: every patched module runs its class's forward again; returns how many were restored."""
    switch_attention(model, KERNEL_ATTENTION, "sdpa")
    patched = patched_forwards(model)
    for module in patched:
        del module.forward
    return len(patched)


def is_enabled(model: nn.Module) -> bool:
    """Whether any module of `model` runs one of the kernels' forwards."""
    return bool(patched_forwards(model))


def patched_forwards(model: nn.Module) -> dict[nn.Module, PatchedForward]:
    """Every module of `model` running one of the kernels' forwards, with that forward (for `restore`)."""
    found = {}
    for module in model.modules():
        forward = vars(module).get("forward")
        if isinstance(forward, PatchedForward):
            found[module] = forward
    return found


def restore(patched: dict[nn.Module, PatchedForward]) -> int:
    """Put back the forwards of `patched_forwards` that something removed since; returns how many.

    transformers (5.x, with the `kernels` package it installs) re-kernelises a `from_pretrained` model on every
    switch between train and eval mode, and that removes the instance-level forward of every module its hub
    kernels know (RMSNorm), petune's among them: without this, `model.train()` silently ran stock RMSNorm."""
    restored = 0
    for module, forward in patched.items():
        if vars(module).get("forward") is not forward:
            vars(module)["forward"] = forward
            restored += 1
    return restored

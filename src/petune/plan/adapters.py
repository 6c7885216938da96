"""Trainable parameters of the layer-wrapping methods beyond LoRA (IA3 ... AdaLoRA), from a Llama-style decoder's
layer shapes and the method's `petune train` options (`Setup.method_options`).

Each count is what `PeftModel.get_nb_trainable_parameters` reports for the model petune builds (checked in
tests/plan/test_memory.py); the formulas follow each method's package under `petune.methods`. Their activations
are planned as the frozen model's: the few per-layer tensors they add (a rotated input, a scaled output) are not
counted.
"""

from __future__ import annotations

from typing import Any

from petune.factors import factorization, nearest_divisor
from petune.plan.architectures import Architecture
from petune.plan.setup import LINEAR_NAMES, Setup

# The layers each method adapts when its options name none (`petune.methods.*`'s defaults for Llama).
DEFAULT_TARGETS = {
    "ia3": ("k_proj", "v_proj", "down_proj"),
    "ln_tuning": ("input_layernorm", "post_attention_layernorm"),
}
NORMS = ("input_layernorm", "post_attention_layernorm")


def targets(setup: Setup, options: Any) -> tuple[str, ...]:
    """The linear layers (or, for LN tuning, the per-layer norms) a method adapts."""
    names = options.target_modules
    if names is None:
        return DEFAULT_TARGETS.get(setup.method, ("q_proj", "v_proj"))
    if names == ["all-linear"]:
        return LINEAR_NAMES
    return tuple(n for n in (*LINEAR_NAMES, *NORMS) if n in names)


def per_module(method: str, options: Any, name: str, fan_in: int, fan_out: int) -> int:
    """Trained numbers of one adapted linear layer (in, out)."""
    if method == "ia3":
        feedforward = options.feedforward_modules or ["down_proj"]
        return fan_in if name in feedforward else fan_out
    if method == "loha":
        return 2 * options.r * (fan_in + fan_out)  # two pairs (out x r, r x in)
    if method == "lokr":
        return lokr_params(options, fan_in, fan_out)
    if method == "vera":
        return fan_out + options.r  # lambda_b (out), lambda_d (r); the shared random matrices are frozen
    if method == "hra":
        return options.r * fan_in
    if method == "fourierft":
        return int(options.n_frequency)
    if method == "oft":
        size = nearest_divisor(fan_in, options.oft_block_size)
        return (1 if options.block_share else fan_in // size) * size * (size - 1) // 2
    if method == "boft":
        size = options.boft_block_size
        return options.boft_n_butterfly_factor * (fan_in // size) * size * size + fan_out  # R blocks, scale s
    if method == "adalora":
        return options.init_r * (fan_in + fan_out + 1)  # A (r x in), B (out x r), E (r)
    raise ValueError(f"petune plan does not count --method {method}")


def lokr_params(options: Any, fan_in: int, fan_out: int) -> int:
    """W1 (a x b) kron W2 (c x d), each factor full or a rank-r product (LyCORIS's rule)."""
    out_a, out_c = factorization(fan_out, options.decompose_factor)
    in_b, in_d = factorization(fan_in, options.decompose_factor)
    r = options.r
    w1 = r * (out_a + in_b) if options.decompose_both and r < max(out_a, in_b) / 2 else out_a * in_b
    w2 = r * (out_c + in_d) if r < max(out_c, in_d) / 2 else out_c * in_d
    return w1 + w2


def module_params(arch: Architecture, setup: Setup, shapes: dict[str, tuple[int, int]]) -> list[int]:
    """Trained numbers of each adapted module of one decoder layer."""
    options = setup.method_options
    if setup.method == "ln_tuning":
        return [arch.hidden_size for name in targets(setup, options) if name in NORMS]
    return [per_module(setup.method, options, t, *shapes[t]) for t in targets(setup, options) if t in shapes]


def layer_method_params(arch: Architecture, setup: Setup, shapes: dict[str, tuple[int, int]]) -> int:
    """All layers' trained numbers; LN tuning also tunes the final norm when its targets include it."""
    total = arch.num_layers * sum(module_params(arch, setup, shapes))
    if setup.method == "ln_tuning":
        names = setup.method_options.target_modules
        total += arch.hidden_size if names is None or "norm" in names else 0
    return total

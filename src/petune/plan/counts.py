"""Parameter counts and training FLOPs of a Llama-style decoder, from its shape alone.

Counts match `sum(p.numel())` of the model transformers builds from the same config, and of the adapters
petune attaches (`PeftModel.get_nb_trainable_parameters`); tests/plan/test_memory.py checks both.
"""

from __future__ import annotations

from petune.plan.adapters import layer_method_params, module_params
from petune.plan.architectures import Architecture
from petune.plan.setup import LAYER_METHODS, LINEAR_NAMES, LORA_FAMILY, Setup


def linear_shapes(arch: Architecture) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder layer."""
    h, q, kv, inter = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    assert tuple(shapes) == LINEAR_NAMES
    return shapes


def linear_params_per_layer(arch: Architecture) -> int:
    """Weights of one layer's seven linear layers (biases not included)."""
    return sum(i * o for i, o in linear_shapes(arch).values())


def layer_params(arch: Architecture) -> int:
    """One decoder layer: linear weights, q/k/v biases when the model has them, two RMSNorm weights."""
    bias = arch.q_dim + 2 * arch.kv_dim if arch.attention_bias else 0
    return linear_params_per_layer(arch) + bias + 2 * arch.hidden_size


def embedding_params(arch: Architecture) -> int:
    """Token embedding plus the output head when it is not tied to it."""
    table = arch.vocab_size * arch.hidden_size
    return table if arch.tie_word_embeddings else 2 * table


def total_params(arch: Architecture) -> int:
    """Every parameter of the model: embeddings (and untied head), layers, final norm."""
    return embedding_params(arch) + arch.num_layers * layer_params(arch) + arch.hidden_size


def adapter_params(arch: Architecture, setup: Setup) -> int:
    """Parameters a PEFT method trains (everything, for full fine-tuning).

    LoRA (Hu et al. 2021): A (r x in) and B (out x r) per adapted linear: r (in + out); DoRA (Liu et al. 2024)
    adds a magnitude per output row. Prompt tuning: V x hidden; p-tuning: that table plus its 3-layer MLP
    (hidden -> e -> e -> hidden, with biases); prefix tuning: V x layers x 2 x kv width, or with its projection
    a V x kv width table and its MLP (kv width -> e -> layers x 2 x kv width, with biases).
    IA3 ... AdaLoRA: `petune.plan.adapters`.
    """
    method, virtual, h = setup.method, setup.virtual_tokens, arch.hidden_size
    if method == "full":
        return total_params(arch)
    if method in LORA_FAMILY:
        shapes = linear_shapes(arch)
        per_layer = sum(setup.lora_r * (shapes[t][0] + shapes[t][1]) for t in setup.adapted)
        if method == "dora":
            per_layer += sum(shapes[t][1] for t in setup.adapted)
        return arch.num_layers * per_layer
    if method in LAYER_METHODS:
        return layer_method_params(arch, setup, linear_shapes(arch))
    if method == "prompt":
        return virtual * h
    if method == "ptuning":
        e = setup.encoder_hidden_size
        return virtual * h + (h * e + e) + (e * e + e) + (e * h + h)
    width = arch.num_layers * 2 * arch.kv_dim  # prefix
    if setup.prefix_projection:
        e, kv = setup.encoder_hidden_size, arch.kv_dim
        return virtual * kv + (kv * e + e) + (e * width + width)
    return virtual * width


def largest_trainable_tensor(arch: Architecture, setup: Setup) -> int:
    """Elements of the biggest trainable tensor (what a per-tensor optimizer step allocates scratch for)."""
    if setup.method == "full":
        return max(arch.vocab_size * arch.hidden_size, *(i * o for i, o in linear_shapes(arch).values()))
    if setup.method in LORA_FAMILY:
        return max(setup.lora_r * max(linear_shapes(arch)[t]) for t in setup.adapted)
    if setup.method in LAYER_METHODS:
        return max(module_params(arch, setup, linear_shapes(arch)), default=0)  # a module's tensors, at most
    return adapter_params(arch, setup)  # prompt methods: about one table


def flops_per_token(arch: Architecture, setup: Setup) -> float:
    """Training FLOPs per input token (forward + backward, + recomputation with checkpointing).

    A matmul with n weights costs 2n FLOPs per token forward, 2n for the input gradient and 2n more for the
    weight gradient when the weight trains: 6N for full fine-tuning (Kaplan et al. 2020), ~4N for PEFT.
    Attention scores and their weighted sum cost 2 x 2 x context x q width per layer forward (Hoffmann et al.
    2022, appendix F, no saving for the causal mask), twice that backward. The embedding lookup is free;
    the output head runs on every token. Prompt methods pay for their virtual tokens too.
    """
    layers, linear, head = arch.num_layers, linear_params_per_layer(arch), arch.vocab_size * arch.hidden_size
    context = setup.seq_len + setup.virtual_in_input + setup.virtual_in_cache
    matmul = layers * linear + head
    attention = 4 * layers * context * arch.q_dim
    trained = matmul if setup.method == "full" else 0
    lora = adapter_params(arch, setup) if setup.method in LORA_FAMILY else 0
    forward = 2 * matmul + attention + 2 * lora
    backward = 2 * matmul + 2 * trained + 2 * attention + 4 * lora
    recompute = 2 * layers * linear + attention + 2 * lora if setup.gradient_checkpointing else 0
    tokens = setup.seq_len + setup.virtual_in_input
    return float(forward + backward + recompute) * tokens / setup.seq_len

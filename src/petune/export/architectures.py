"""What llama.cpp expects of each architecture petune exports: its GGUF name, tensor names and layouts.

Tensor names come from gguf's own table (`gguf.TensorNameMap`, the one llama.cpp's converter uses), so
`model.layers.3.self_attn.q_proj.weight` becomes `blk.3.attn_q.weight`. The one change of layout is the
rotary permutation of Llama-family query/key rows (below); Qwen2 keeps the Hugging Face layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, TensorNameMap

from petune.train import UserError


@dataclass(frozen=True)
class Architecture:
    """How one transformers `model_type` is written for llama.cpp."""

    arch: MODEL_ARCH
    permute_query_key: bool  # Llama-family rotary layout (see `permute_rotary`)


ARCHITECTURES = {
    "llama": Architecture(MODEL_ARCH.LLAMA, permute_query_key=True),  # also SmolLM2
    "mistral": Architecture(MODEL_ARCH.LLAMA, permute_query_key=True),  # a Llama to llama.cpp
    "qwen2": Architecture(MODEL_ARCH.QWEN2, permute_query_key=False),  # q/k/v biases, NEOX rotary
}
SUFFIXES = (".weight", ".bias")


def architecture_of(config: Any) -> Architecture:
    """The `Architecture` of a transformers config; a `UserError` listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UserError(
            f"petune cannot export a {model_type!r} model to GGUF (supported: {supported}); "
            "use --format hf and llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(
            f"petune exports only plain rotary embeddings; this model uses {rope.get('rope_type')!r} rope "
            "scaling: use --format hf and llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[model_type]


def arch_name(architecture: Architecture) -> str:
    """The `general.architecture` string, e.g. "llama"."""
    return MODEL_ARCH_NAMES[architecture.arch]


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_hyperparameters(writer: GGUFWriter, config: Any) -> None:
    """The `<arch>.*` keys llama.cpp (and transformers' GGUF reader) build the network from."""
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if head_dim(config) * int(config.num_attention_heads) != int(config.hidden_size):
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))


class TensorNames:
    """Hugging Face parameter names to GGUF tensor names, and the rows to permute, for one model."""

    def __init__(self, architecture: Architecture, config: Any) -> None:
        self.architecture = architecture
        self.table = TensorNameMap(architecture.arch, int(config.num_hidden_layers))
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)

    def gguf_name(self, hf_name: str) -> str:
        """`blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`; a `UserError` if unmapped."""
        name = self.table.get_name(hf_name, try_suffixes=SUFFIXES)
        if name is None:
            raise UserError(f"no GGUF tensor for {hf_name!r} in a {arch_name(self.architecture)} model")
        return name

    def rotary_heads(self, gguf_name: str) -> int | None:
        """The head count to permute `gguf_name`'s rows by (query: heads, key: kv heads), or None."""
        if not self.architecture.permute_query_key:
            return None
        if ".attn_q." in gguf_name:
            return self.heads
        if ".attn_k." in gguf_name:
            return self.kv_heads
        return None


def permute_rotary(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a Llama-family query/key projection into llama.cpp's rotary layout.

    Hugging Face rotates the first half of each head's dimensions against the second half; llama.cpp (the
    original Llama code) rotates adjacent pairs. Within each head, row `i` of the first half and row `i` of
    the second half become rows `2i` and `2i + 1`. `rows` is (heads * head_dim, ...): a weight, a bias or a
    LoRA B factor, all of which have the projection's outputs first. transformers' GGUF reader undoes it.
    """
    shape = rows.shape
    halves = rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
    return halves.transpose(1, 2).reshape(shape)

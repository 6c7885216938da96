"""Model shapes for `petune plan`: a built-in table of popular decoders, or read from config.json / GGUF.

Every model here is a Llama-style decoder: RMSNorm, rotary attention with grouped-query heads, a gated
(SwiGLU) MLP. That is all `plan` needs to count parameters, activations and FLOPs; the numbers below are
the fields of each model's `config.json` on the Hugging Face hub. They were written down from those files
and the papers cited beside them (this machine cannot reach the hub); `tests/plan/test_memory.py` checks that
each shape gives the model's published parameter count, and that transformers builds a model of exactly
the size `petune.plan.counts` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petune.files import read_json
from petune.train import UserError


@dataclass(frozen=True)
class Architecture:
    """The shape of a Llama-style decoder, in `config.json`'s terms."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    attention_bias: bool = False  # Qwen2 has biases on q, k and v
    source: str = ""

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(self, field) < 1:
                raise UserError(f"model {self.name}: {field} must be at least 1, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model {self.name}: {self.num_heads} heads do not split into {self.num_kv_heads} kv groups"
            )

    @property
    def q_dim(self) -> int:
        """Width of the query projection (and of the attention output): heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key and of the value projection: kv heads x head_dim."""
        return self.num_kv_heads * self.head_dim


_LLAMA1 = "LLaMA paper (Touvron et al. 2023a) Table 2; intermediate size from the HF config.json"
_LLAMA2 = "Llama 2 paper (Touvron et al. 2023b) and meta-llama/Llama-2-*-hf config.json"
_LLAMA3 = "Llama 3 paper (Grattafiori et al. 2024) Table 3 and meta-llama/Meta-Llama-3-* config.json"
_MISTRAL = "Mistral 7B paper (Jiang et al. 2023) Table 1 and mistralai/Mistral-7B-v0.1 config.json"
_QWEN = "Qwen2.5 technical report (Qwen team 2024) Table 1 and Qwen/Qwen2.5-* config.json (q/k/v biases)"
_SMOL = "HuggingFaceTB/SmolLM2-* config.json (135M also checked against the embedded model)"

# name: (source, hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings, max positions),
# with the published parameter count, which tests/plan/test_memory.py checks.
_TABLE: dict[str, tuple[str, int, int, int, int, int, int, bool, int]] = {
    "llama-7b": (_LLAMA1, 4096, 32, 32, 32, 11008, 32000, False, 2048),  # 6.7B
    "llama-13b": (_LLAMA1, 5120, 40, 40, 40, 13824, 32000, False, 2048),  # 13.0B
    "llama-30b": (_LLAMA1, 6656, 60, 52, 52, 17920, 32000, False, 2048),  # 32.5B
    "llama-65b": (_LLAMA1, 8192, 80, 64, 64, 22016, 32000, False, 2048),  # 65.2B
    "llama-2-7b": (_LLAMA2, 4096, 32, 32, 32, 11008, 32000, False, 4096),  # 6,738,415,616
    "llama-2-13b": (_LLAMA2, 5120, 40, 40, 40, 13824, 32000, False, 4096),  # 13,015,864,320
    "llama-2-70b": (_LLAMA2, 8192, 80, 64, 8, 28672, 32000, False, 4096),  # 68,976,648,192
    "llama-3-8b": (_LLAMA3, 4096, 32, 32, 8, 14336, 128256, False, 8192),  # 8,030,261,248
    "llama-3-70b": (_LLAMA3, 8192, 80, 64, 8, 28672, 128256, False, 8192),  # 70,553,706,496
    "mistral-7b": (_MISTRAL, 4096, 32, 32, 8, 14336, 32000, False, 32768),  # 7,241,732,096
    "qwen2.5-0.5b": (_QWEN, 896, 24, 14, 2, 4864, 151936, True, 32768),  # 0.49B
    "qwen2.5-1.5b": (_QWEN, 1536, 28, 12, 2, 8960, 151936, True, 32768),  # 1.54B
    "qwen2.5-3b": (_QWEN, 2048, 36, 16, 2, 11008, 151936, True, 32768),  # 3.09B
    "qwen2.5-7b": (_QWEN, 3584, 28, 28, 4, 18944, 152064, False, 32768),  # 7.61B
    "qwen2.5-14b": (_QWEN, 5120, 48, 40, 8, 13824, 152064, False, 32768),  # 14.7B
    "qwen2.5-32b": (_QWEN, 5120, 64, 40, 8, 27648, 152064, False, 32768),  # 32.5B
    "qwen2.5-72b": (_QWEN, 8192, 80, 64, 8, 29568, 152064, False, 32768),  # 72.7B
    "smollm2-135m": (_SMOL, 576, 30, 9, 3, 1536, 49152, True, 8192),  # 134,515,008
    "smollm2-360m": (_SMOL, 960, 32, 15, 5, 2560, 49152, True, 8192),  # 361,821,120
    "smollm2-1.7b": (_SMOL, 2048, 24, 32, 32, 8192, 49152, True, 8192),  # 1,711,376,384
}
ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture(name, h, layers, heads, kv, inter, vocab, tied, positions, 0, source == _QWEN, source)
    for name, (source, h, layers, heads, kv, inter, vocab, tied, positions) in _TABLE.items()
}
ALIASES = {"embedded": "smollm2-135m", "smollm2": "smollm2-135m", "mistral-7b-v0.1": "mistral-7b"}

# config.json fields `plan` cannot do without (the rest have Llama's defaults).
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def resolve_architecture(model: str) -> Architecture:
    """A built-in name (`llama-2-7b`), a model folder or its config.json, or a .gguf file."""
    key = model.lower()
    if key in ALIASES or key in ARCHITECTURES:
        return ARCHITECTURES[ALIASES.get(key, key)]
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix.lower() == ".gguf" and path.is_file():
        return from_gguf(path)
    if path.name.endswith(".json") and path.is_file():
        return from_config_json(path)
    known = ", ".join(sorted(ARCHITECTURES))
    raise UserError(f"unknown model {model!r}: give a config.json, a model folder, a .gguf file or one of: {known}")


def from_config_json(path: Path) -> Architecture:
    """The shape in a Hugging Face config.json (a Llama-style decoder: llama, mistral, qwen2, ...)."""
    config = read_json(path, "model config", "pass the config.json of a Hugging Face model")
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object")
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    missing = [field for field in REQUIRED_FIELDS if not isinstance(config.get(field), int)]
    if missing:
        raise UserError(f"{path} lacks the field(s) plan needs: {', '.join(missing)} (a Llama-style decoder config)")
    heads = config["num_attention_heads"]
    return Architecture(
        name=str(config.get("_name_or_path") or config.get("model_type") or path.parent.name),
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        head_dim=config.get("head_dim") or 0,
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        source=str(path),
    )


def from_gguf(path: Path) -> Architecture:
    """The shape in a GGUF file's metadata (`<arch>.embedding_length` and so on)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    keys = {
        "hidden_size": f"{arch}.embedding_length",
        "num_hidden_layers": f"{arch}.block_count",
        "num_attention_heads": f"{arch}.attention.head_count",
        "intermediate_size": f"{arch}.feed_forward_length",
    }
    found = {name: value(key) for name, key in keys.items()}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    found["vocab_size"] = value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    missing = [f"{name} ({keys.get(name, 'tokenizer.ggml.tokens')})" for name, v in found.items() if v is None]
    if missing:
        raise UserError(f"{path} lacks the metadata plan needs: {', '.join(missing)}")
    tensors = {tensor.name for tensor in reader.tensors}
    return Architecture(
        name=str(value("general.name") or path.stem),
        hidden_size=int(found["hidden_size"]),
        num_layers=int(found["num_hidden_layers"]),
        num_heads=int(found["num_attention_heads"]),
        num_kv_heads=int(value(f"{arch}.attention.head_count_kv") or found["num_attention_heads"]),
        intermediate_size=int(found["intermediate_size"]),
        vocab_size=int(found["vocab_size"]),
        tie_word_embeddings="output.weight" not in tensors,  # no separate head: it reuses token_embd
        max_position_embeddings=int(value(f"{arch}.context_length") or 2048),
        head_dim=int(value(f"{arch}.attention.key_length") or 0),
        attention_bias="blk.0.attn_q.bias" in tensors,
        source=str(path),
    )

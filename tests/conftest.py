"""Tiny models built from configs (no hub access), shared by every test file.

`make_model("llama", "causal_lm")` builds a 2-layer, hidden-32, vocab-100 model whose weights depend only
on the seed, so two builds are identical: one can be wrapped by petune and the other by `peft`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

# The models here are tiny: one thread is as fast as two, and far faster when other processes share the
# cores (each small op would otherwise wait at an OpenMP barrier for a descheduled thread).
torch.set_num_threads(int(os.environ.get("PETUNE_TEST_THREADS", "1")))

VOCAB_SIZE = 100
HIDDEN_SIZE = 32
PAD_TOKEN_ID = 0
NUM_LABELS = 3
ARCHITECTURES = ("llama", "qwen2", "gpt2", "bert")
DECODERS = ("llama", "qwen2", "gpt2")  # the architectures with a causal-LM head
TASKS = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification, "base": AutoModel}


def tiny_config(arch: str, **overrides: object) -> PretrainedConfig:
    """A 2-layer config of `arch`; Llama uses grouped-query attention (4 query heads, 2 key/value heads)."""
    common: dict[str, object] = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD_TOKEN_ID, "num_labels": NUM_LABELS}
    config: PretrainedConfig
    if arch in ("llama", "qwen2"):
        config_class = LlamaConfig if arch == "llama" else Qwen2Config
        config = config_class(
            hidden_size=HIDDEN_SIZE,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=HIDDEN_SIZE, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **common
        )
    elif arch == "bert":
        config = BertConfig(
            hidden_size=HIDDEN_SIZE,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **common,
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny_model(arch: str, task: str = "causal_lm", seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A tiny fp32 `arch` model for `task` ("causal_lm", "seq_cls" or "base"), in eval mode.

    The weights depend only on `seed`, so two calls return identical models.
    """
    if arch == "bert" and task == "causal_lm":
        raise ValueError("BERT has no causal-LM head here; use task='seq_cls' or 'base'")
    torch.manual_seed(seed)
    model: PreTrainedModel = TASKS[task].from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    return model.eval()


class TinyMLP(torch.nn.Module):
    """A plain `nn.Module` (no transformers): x (batch, 6) -> fc1 -> relu -> fc2 -> (batch, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return result


def build_tiny_mlp(seed: int = 0) -> TinyMLP:
    """A `TinyMLP` whose weights depend only on `seed`."""
    torch.manual_seed(seed)
    return TinyMLP()


def build_batch(seed: int = 1, rows: int = 2, length: int = 8, pad: bool = True) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` of shape (rows, length); with `pad`, the last row ends in two pad tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB_SIZE, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad and rows > 1:
        input_ids[-1, -2:] = PAD_TOKEN_ID
        attention_mask[-1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def model_output(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs: object) -> torch.Tensor:
    """The model's main output tensor, without gradients: `logits`, else `last_hidden_state`."""
    with torch.no_grad():
        out = model(**batch, **kwargs)
    tensor = getattr(out, "logits", None)
    if tensor is None:
        tensor = out.last_hidden_state
    result: torch.Tensor = tensor.detach().clone()
    return result


@pytest.fixture
def make_model() -> Callable[..., PreTrainedModel]:
    """`make_model(arch, task="causal_lm", seed=0, **config_overrides)`: see `build_tiny_model`."""
    return build_tiny_model


@pytest.fixture
def make_mlp() -> Callable[..., TinyMLP]:
    """`make_mlp(seed=0)`: see `build_tiny_mlp`."""
    return build_tiny_mlp


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """A fixed (2, 8) batch with padding in the second row."""
    return build_batch()


@pytest.fixture
def output_of() -> Callable[..., torch.Tensor]:
    """`output_of(model, batch, **kwargs)`: logits (or last hidden state) without gradients."""
    return model_output


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """`make_batch(seed=1, rows=2, length=8, pad=True)`: see `build_batch`."""
    return build_batch

"""`PromptLearningConfig`: the fields the prompt methods share; `model_sizes`: the model shapes behind them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from petune.config import PeftConfig, TaskType

# Task types whose labels do not line up with tokens shifted by virtual tokens, or whose model is no decoder.
UNSUPPORTED_TASKS = (TaskType.SEQ_2_SEQ_LM, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS)


@dataclass
class PromptLearningConfig(PeftConfig):
    """Virtual tokens in front of every sequence (HF PEFT's `PromptLearningConfig`).

    The size fields are read from the model when left None, and written to `adapter_config.json` so a
    folder can be checked against the model it is loaded onto.

    Args:
        num_virtual_tokens: V, the number of virtual tokens put in front of every sequence.
        token_dim: the width of one virtual token: the model's hidden size for prompt tuning and
            P-tuning; key/value heads * head_dim for prefix tuning.
        num_transformer_submodules: 1 for the decoder-only models petune supports (2 would be T5's encoder and decoder).
        num_attention_heads: the model's attention heads; its key/value heads for prefix tuning (as HF PEFT writes).
        num_layers: the model's number of transformer blocks.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"{name}.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.task_type in UNSUPPORTED_TASKS:
            raise ValueError(
                f"{name}: task_type {TaskType(self.task_type).value} is not supported by petune's prompt methods; "
                f"use CAUSAL_LM or SEQ_CLS with a decoder-only model"
            )
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"{name}.num_transformer_submodules={self.num_transformer_submodules}: only 1 works")

    @property
    def is_prompt_learning(self) -> bool:
        return True


@dataclass(frozen=True)
class ModelSizes:
    """What a decoder-only transformers model's config says about its shape."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int  # fewer than num_heads under grouped-query attention
    head_dim: int
    max_positions: int | None  # None: no limit known (the model has no `max_position_embeddings`)

    @property
    def kv_dim(self) -> int:
        """Width of one token's keys (or values) in one layer: kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim


def model_sizes(model: nn.Module) -> ModelSizes:
    """Read layer count, widths, heads and maximum positions from `model.config` (a transformers model)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"prompt methods need a transformers model with a config, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model; prompt methods need a decoder-only one")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    num_heads = int(config.num_attention_heads)
    hidden_size = int(config.hidden_size)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden_size // num_heads)
    max_positions = getattr(config, "max_position_embeddings", None)
    return ModelSizes(
        num_layers=int(config.num_hidden_layers),
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_positions=int(max_positions) if max_positions else None,
    )

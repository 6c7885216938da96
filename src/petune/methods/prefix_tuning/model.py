"""Prefix tuning: V trained keys and values in front of every layer's attention, fed through the cache.

The encoder's output, one row of num_layers * 2 * kv_heads * head_dim numbers per virtual token, is laid out
as HF PEFT lays it out: (V, num_layers * 2, kv_heads, head_dim), layer i's keys at 2i and values at 2i + 1.
The prefix enters the model as a cache of length V, so the caller's tokens sit at positions V, V+1, ... as in
HF PEFT, and the attention mask gets V ones in front.

Where HF PEFT 0.21 breaks and petune does not:
- gradient checkpointing: HF PEFT refuses it (transformers drops the cache of a checkpointed layer); petune
  passes a read-only `PrefixCache` that checkpointed layers may keep (see `cache.py`);
- `generate` with or without a cache, left padding and beam search: the prefix is built for the batch of every
  step that starts a sequence (after beam expansion), and positions are counted over the attention mask;
- resuming training: with `prefix_projection`, the table and the MLP are saved next to `prompt_embeddings`;
- sequence classification: HF PEFT looks for a `past_key_values` parameter in the model's forward, which
  transformers 5 renamed `cache`, and raises "Model does not support past key values".

HF PEFT writes the key/value head count into `num_attention_heads` (and kv_heads * head_dim into `token_dim`);
petune writes the same, so the two read each other's configs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petune.config import PeftConfig
from petune.methods.prefix_tuning.config import PrefixTuningConfig
from petune.methods.prompt_learning import PromptLearning, PromptLearningConfig, VirtualTokenEncoder
from petune.methods.prompt_learning.cache import (
    KeyValue,
    PrefixCache,
    attach,
    cache_through_checkpointing,
    find_cache,
)
from petune.methods.prompt_learning.packed_pass import takes_packed_attention, use_packed_attention


class PrefixEncoder(VirtualTokenEncoder):
    """`embedding` (V, token_dim) -> `transform` (Linear-Tanh-Linear) -> (V, num_layers * 2 * token_dim),
    or with `prefix_projection=False` the table (V, num_layers * 2 * token_dim) itself."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        assert config.num_virtual_tokens is not None and config.token_dim is not None and config.num_layers
        width = config.num_layers * 2 * config.token_dim
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            last: nn.Module = self.transform[-1]
            self.reparameterized = True
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero":
            for param in last.parameters():
                nn.init.zeros_(param)

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.transform(embeddings)
        return out


class PrefixTuning(PromptLearning):
    """Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"."""

    config_class = PrefixTuningConfig
    virtual_tokens_in_input = False

    def expected_sizes(self) -> dict[str, int]:
        return {
            "num_layers": self.sizes.num_layers,
            "token_dim": self.sizes.kv_dim,
            "num_attention_heads": self.sizes.num_kv_heads,
        }

    def token_shape(self, num_layers: int, token_dim: int, num_attention_heads: int) -> tuple[int, ...]:
        # per virtual token: (layers, keys and values, kv_heads, head_dim)
        return (num_layers, 2, num_attention_heads, token_dim // num_attention_heads)

    def build_encoder(self, config: PromptLearningConfig) -> VirtualTokenEncoder:
        assert isinstance(config, PrefixTuningConfig)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        return PrefixEncoder(config)

    def prefix(self, encoder: VirtualTokenEncoder, batch: int) -> list[KeyValue]:
        """Each layer's (keys, values), (batch, kv_heads, V, head_dim) each, in the model's dtype."""
        dtype = self.model.get_input_embeddings().weight.dtype  # type: ignore[operator]
        states = encoder().to(dtype)  # (V, layers * 2 * kv_heads * head_dim)
        virtual = states.shape[0]
        states = states.view(virtual, self.sizes.num_layers * 2, self.sizes.num_kv_heads, self.sizes.head_dim)
        states = states.permute(1, 2, 0, 3)  # (layers * 2, kv_heads, V, head_dim)
        return [
            (states[2 * i].expand(batch, -1, -1, -1), states[2 * i + 1].expand(batch, -1, -1, -1))
            for i in range(self.sizes.num_layers)
        ]

    def insert_virtual_tokens(
        self, config: PromptLearningConfig, encoder: VirtualTokenEncoder, kwargs: dict[str, Any], batch: int
    ) -> dict[str, Any]:
        """Give the call a cache holding the prefix (see `cache.attach`)."""
        return attach(self.model, kwargs, self.prefix(encoder, batch), self.cache_keyword())

    def past_length(self, cache: Any) -> int:
        # A PrefixCache holds no caller tokens: a call given one (generate without a cache passes the last
        # output's back) starts its sequence again.
        return 0 if cache is None or isinstance(cache, PrefixCache) else int(cache.get_seq_length())

    def forward(
        self, name: str, config: PeftConfig, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        assert isinstance(module, VirtualTokenEncoder) and isinstance(config, PromptLearningConfig)
        kwargs = self._keywords(args, kwargs)
        starts = self.past_length(find_cache(kwargs)[1]) == 0
        args, kwargs = self.prepare_inputs(name, config, module, (), kwargs)
        mask = kwargs.get("attention_mask")
        if starts and takes_packed_attention(self.model) and (mask is None or bool(mask.all())):
            use_packed_attention(self.model)  # rows without padding: causal attention behind the prefix
            kwargs["petune_prefix"] = config.num_virtual_tokens
        with cache_through_checkpointing(self.model, projected=module.reparameterized):
            return self.model(*args, **kwargs)

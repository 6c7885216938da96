"""Prompt tuning and P-tuning in training: the virtual tokens and every row in one sequence, one pass.

The V virtual tokens are the same in every row and, in a causal model, see only each other, so one copy of
them serves the whole batch. `shared_pass.py` runs that copy as a separate batch of one; in a training step
that pass streams every frozen weight from memory again for V positions (measured on SmolLM2, 4 x 256 tokens:
about 200 ms, 4% of the step, for under 2% of its FLOPs). Packing removes it: the copy and the B rows of T
tokens go through the model as one sequence of V + B x T positions, so every matrix multiplication runs on
all of them at once, and only attention knows the layout:

    positions  [0 .. V-1 | V .. V+T-1 | V .. V+T-1 | ...]    (virtual | row 0 | row 1 | ...)

`packed_attention` (registered with transformers' `AttentionInterface`) lets the virtual tokens attend
causally to each other and each row's tokens to the virtual tokens and to its own earlier tokens: exactly the
attention of the per-row sequence [virtual, row], which is how it computes it (`Packing.attend`). Without a
`Packing` in its arguments it is transformers' SDPA attention (`petune.kernels.attention.sdpa_forward`), so
the model keeps it once switched to it (generation, the base model alone); `PeftModel.unload()` switches back.
A forward hook on the decoder unpacks its output to (B, V + T, H), the virtual positions broadcast over the
rows, so the head, the loss, `logits_to_keep` and `output_hidden_states` see the per-row layout.

Packing applies to calls that do not return a cache (training steps, `use_cache=False`) on decoders whose
attention goes through transformers' attention interface with SDPA and no sliding window (Llama, Qwen2,
GPT-2, ...); gradient checkpointing, reentrant or not, recomputes each layer of the one sequence as usual.
Other calls take the shared pass or the per-row path. Dropout inside the model draws one mask for the
virtual positions, shared by the rows, as in the shared pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from petune.kernels.attention import (
    KERNEL_ATTENTION,
    causal_attention,
    interface_config,
    sdpa_forward,
    switch_attention,
)
from petune.kernels.prefix_attention import causal_attention_behind_prefix, merged_prefix_attention, merges
from petune.methods.prompt_learning.cache import input_shape, labels_behind_virtual
from petune.methods.prompt_learning.config import PromptLearningConfig
from petune.methods.prompt_learning.encoder import VirtualTokenEncoder

if TYPE_CHECKING:
    from petune.methods.prompt_learning.method import PromptLearning

PACKED_ATTENTION = "petune_packed_sdpa"
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")  # attention variants packing does not do


@dataclass(frozen=True)
class Packing:
    """The layout of one packed sequence: `virtual` tokens, then `rows` rows of `length` tokens."""

    virtual: int
    rows: int
    length: int
    mask: torch.Tensor | None  # (rows, 1, V + T, V + T) bool where a row has padding; None: causal

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scale: float | None
    ) -> torch.Tensor:
        """Attention of the packed (1, heads, V + B*T, head_dim) tensors; (1, V + B*T, heads, head_dim) out.

        Each row attends as the sequence [virtual, row]. Where `prefix_attention` merges (fp32 on a CPU, no
        padding) the virtual tokens attend to each other once and the rows' queries to the virtual keys and
        causally to their own. Otherwise each row runs as [virtual, row], the virtual queries included (with no
        padding `is_causal`, no mask), and the virtual tokens' output is taken from the first row.
        """
        if self.mask is None and merges(query, dropout, key, value):
            return self.attend_behind_virtual(query, key, value, scale)
        query, key, value = self.per_row(query), self.per_row(key), self.per_row(value)
        if self.mask is None:
            out = causal_attention(query, key, value, dropout, scale)
        else:
            out = F.scaled_dot_product_attention(
                query, key, value, self.mask, dropout, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
            )
        out = out.transpose(1, 2)  # (B, V + T, heads, head_dim)
        virtual, rows = out.split([self.virtual, self.length], dim=1)
        return torch.cat([virtual[:1], rows.reshape(1, self.rows * self.length, *out.shape[2:])], dim=1)

    def attend_behind_virtual(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """`attend` by `MergedPrefixAttention`: the virtual queries once, the rows' without repeats."""
        (virtual_query, query), (virtual_key, key), (virtual_value, value) = (
            packed.split([self.virtual, self.rows * self.length], dim=2) for packed in (query, key, value)
        )
        virtual = causal_attention(virtual_query, virtual_key, virtual_value, 0.0, scale)  # (1, heads, V, d)
        prefix = (virtual_key.expand(self.rows, -1, -1, -1), virtual_value.expand(self.rows, -1, -1, -1))
        rows = merged_prefix_attention(self.rows_of(query), self.rows_of(key), self.rows_of(value), *prefix, scale)
        packed_rows = rows.transpose(1, 2).reshape(1, self.rows * self.length, *rows.shape[1::2])
        return torch.cat([virtual.transpose(1, 2), packed_rows], dim=1)

    # split, not two slices: a slice's backward fills a zero tensor of the whole input for each part

    def per_row(self, packed: torch.Tensor) -> torch.Tensor:
        """(1, heads, V + B*T, d) -> (B, heads, V + T, d): the virtual part in front of every row."""
        virtual, rows = packed.split([self.virtual, self.rows * self.length], dim=2)
        return torch.cat([virtual.expand(self.rows, -1, -1, -1), self.rows_of(rows)], dim=2)

    def rows_of(self, rows: torch.Tensor) -> torch.Tensor:
        """(1, heads, B*T, d) -> (B, heads, T, d), a view."""
        return rows[0].unflatten(1, (self.rows, self.length)).transpose(0, 1)

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, V + B*T, H) -> (B, V + T, H), the virtual positions broadcast over the rows."""
        virtual, rows = hidden.split([self.virtual, self.rows * self.length], dim=1)
        return torch.cat([virtual.expand(self.rows, -1, -1), rows[0].unflatten(0, (self.rows, self.length))], dim=1)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    petune_packing: Packing | None = None,
    petune_prefix: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention (with `petune.kernels.attention`'s exception), or the packed layout's when
    the call carries a `Packing`, or causal attention behind a prefix of `petune_prefix` keys (prefix tuning,
    rows without padding)."""
    if petune_packing is None and petune_prefix is None:
        return sdpa_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"petune's packed prompt-method attention does not support {unsupported}")
    if petune_packing is not None:
        return petune_packing.attend(query, key, value, dropout, scaling), None
    assert petune_prefix is not None
    return attend_behind_prefix(query, key, value, petune_prefix, dropout, scaling), None


def attend_behind_prefix(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, virtual: int, dropout: float, scale: float | None
) -> torch.Tensor:
    """(B, heads, T, d) queries over (B, kv_heads, V + T, d) keys: every prefix key and the causal rest; (B, T,
    heads, d) out, without the explicit (T, V + T) mask transformers hands SDPA here."""
    return causal_attention_behind_prefix(query, key, value, virtual, dropout, scale).transpose(1, 2)


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def can_pack(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this call (already one the shared pass could take) may run packed."""
    use_cache = kwargs.get("use_cache")
    return (
        takes_packed_attention(model)
        and (use_cache is False or (use_cache is None and model.training))
        and kwargs.get("token_type_ids") is None
    )


def takes_packed_attention(model: nn.Module) -> bool:
    """Whether `model`'s attention may be switched to `packed_attention`: transformers' SDPA, no sliding window."""
    config = interface_config(model)
    return (
        config is not None
        and config._attn_implementation in ("sdpa", KERNEL_ATTENTION, PACKED_ATTENTION)
        and not _sliding_window(config)
    )


def _sliding_window(config: Any) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any("sliding" in kind for kind in layer_types)
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)


def forward_packed(
    method: PromptLearning, config: PromptLearningConfig, encoder: VirtualTokenEncoder, kwargs: dict[str, Any]
) -> Any:
    """The model's output for the caller's tokens behind the virtual ones, all in one packed sequence."""
    model = method.model
    assert config.num_virtual_tokens is not None
    virtual = config.num_virtual_tokens
    rows, length = input_shape(kwargs)
    kwargs = method.make_room(config, kwargs, feeds_virtual=True)  # checks the length; (B, V + T) mask, positions
    mask = kwargs.pop("attention_mask", None)
    positions = kwargs.pop("position_ids", None)
    embeds, prompts = method.take_embeddings(encoder, kwargs)  # (B, T, H), (V, H)
    device = embeds.device
    if positions is None:
        positions = torch.arange(virtual + length, device=device).unsqueeze(0)
    row_positions = positions[:, virtual:].expand(rows, -1).reshape(-1)
    packed_positions = torch.cat([torch.arange(virtual, device=device), row_positions]).unsqueeze(0)
    allowed = None
    if mask is not None and not bool(mask.all()):  # padding: causal and the row's own keys
        causal = torch.ones(virtual + length, virtual + length, dtype=torch.bool, device=device).tril()
        allowed = causal & mask.bool()[:, None, None, :]
    packing = Packing(virtual, rows, length, allowed)
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs["labels"] = labels_behind_virtual(labels, virtual)

    use_packed_attention(model)
    decoder: nn.Module = model.get_decoder()  # type: ignore[operator]
    hook = decoder.register_forward_hook(functools.partial(_unpack_output, packing), prepend=True)
    try:
        return model(
            inputs_embeds=torch.cat([prompts, embeds.flatten(0, 1)]).unsqueeze(0),
            attention_mask=torch.ones(1, virtual + rows * length, dtype=torch.long, device=device),
            position_ids=packed_positions,
            petune_packing=packing,
            **{**kwargs, "use_cache": False},
        )
    finally:
        hook.remove()


def _unpack_output(packing: Packing, _module: nn.Module, _args: Any, output: Any) -> Any:
    output.last_hidden_state = packing.unpack(output.last_hidden_state)
    if output.get("hidden_states") is not None:
        output.hidden_states = tuple(packing.unpack(hidden) for hidden in output.hidden_states)
    return output


def use_packed_attention(model: nn.Module) -> None:
    """Switch `model` to `packed_attention` for good: it is SDPA for every call that carries no layout."""
    model.config._attn_implementation = PACKED_ATTENTION  # type: ignore[union-attr]


def restore_attention(model: nn.Module) -> None:
    """Put back the model's SDPA attention (unloading the adapter; `petune.kernels.disable` ran already)."""
    switch_attention(model, PACKED_ATTENTION, "sdpa")

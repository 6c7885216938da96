"""Causal attention behind a prefix on a CPU: two flash-attention calls merged by their log-sum-exps.

The prompt methods' rows attend to V prefix keys (prefix tuning's trained keys, or the virtual tokens'
keys in the packed prompt pass) and to their own T keys causally. transformers hands SDPA an explicit
(T, V + T) mask for that; without this module petune runs it as causal attention over V + T queries, V of them
in front of each row (the virtual tokens' own, or zeros) with their outputs dropped. Here it is the two parts
of the softmax, each one flash-attention call:

    rows over their own keys, causal   o1, lse1   (what a LoRA step runs)
    rows over the V prefix keys        o2, lse2   (T x V scores)
    lse = logaddexp(lse1, lse2),  out = exp(lse1 - lse) o1 + exp(lse2 - lse) o2

Backward runs each call's flash backward with the merged `out` and `lse`: with them the probabilities it
recomputes, exp(scores - lse), and its rowsum(dO * out) are the whole softmax's, so each part's gradients
are exact (ring attention splits its keys the same way).

What it saves is clearest in the packed prompt pass, which otherwise runs every row as [virtual, row]: the V
virtual queries once per row, and queries, keys and values copied into per-row sequences. Measured on SmolLM2,
fp32, batch 4 x 256, 16 virtual tokens, one process stepping each method with and without it in turn: prompt
tuning 94 and 111 ms (2.5-3%) faster a step in two runs, P-tuning's LSTM 76 ms in one; prefix tuning, whose
unpadded rows had V zero queries in front, 101 and 50 ms faster and 57 ms slower in three: the run's noise.
The attention call alone (`python benchmarks/prefix_attention.py`) takes about what the zero-query form does:
at 256 + 16 keys 17.2 against 17.5 ms (the explicit mask 15.9 ms, the rows alone 14.2 ms).

It runs for CPU tensors in the dtypes `attention.BlockedCausalAttention` does not take (fp32, fp64), without
dropout, with the kernels on; other calls go through `attention.causal_attention` with zero queries.
"""

from __future__ import annotations

from typing import Any

import torch

from petune.kernels.attention import DTYPES, causal_attention

# torch's CPU flash attention, which SDPA calls; private ops, so a torch without them runs the zero-query form
_FLASH: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def causal_attention_behind_prefix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    virtual: int,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """(B, heads, T, d) queries over (B, kv_heads, V + T, d) keys and values: all of the first V, causal over
    the rest (heads a multiple of kv_heads). (B, heads, T, d) out."""
    length = query.shape[2]
    if key.shape[2] != virtual + length:
        raise ValueError(f"expected {virtual} prefix keys before the {length} queries' own, got {key.shape[2]}")
    if merges(query, dropout, key, value):
        (prefix_key, key), (prefix_value, value) = (x.split([virtual, length], dim=2) for x in (key, value))
        return merged_prefix_attention(query, key, value, prefix_key, prefix_value, scale)
    padded = torch.cat([query.new_zeros(*query.shape[:2], virtual, query.shape[3]), query], dim=2)
    return causal_attention(padded, key, value, dropout, scale).split([virtual, length], dim=2)[1]


def merged_prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """`MergedPrefixAttention` of (B, heads, T, d) queries, their own (B, kv_heads, T, d) keys and values and
    (B, kv_heads, V, d) prefix ones, for calls `merges` takes. (B, heads, T, d) out."""
    out: torch.Tensor = MergedPrefixAttention.apply(query, key, value, prefix_key, prefix_value, scale)
    return out


def merges(query: torch.Tensor, dropout: float, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether attention behind a prefix runs as `MergedPrefixAttention` (see the module's doc).

    Under CPU autocast (TRL's default `bf16=True`) the rotated query and key are fp32 beside a bf16 value; the flash
    op takes one dtype, so such calls go through SDPA, which autocast casts.
    """
    from petune.kernels import enabled_by_default

    return (
        query.device.type == "cpu"
        and key.dtype == value.dtype == query.dtype
        and query.dtype not in DTYPES
        and dropout == 0.0
        and _FLASH_BACKWARD is not None
        and enabled_by_default()
    )


class MergedPrefixAttention(torch.autograd.Function):
    """softmax(scale Q [K_prefix; K]^T + mask) [V_prefix; V] for the mask of `causal_attention_behind_prefix`."""

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        prefix_key: torch.Tensor,
        prefix_value: torch.Tensor,
        scale: float | None,
    ) -> torch.Tensor:
        own, own_lse = _FLASH(query, key, value, 0.0, True, scale=scale)
        prefix, prefix_lse = _FLASH(query, prefix_key, prefix_value, 0.0, False, scale=scale)
        lse = torch.logaddexp(own_lse, prefix_lse)
        own_weight = torch.exp(own_lse - lse).unsqueeze(-1)
        prefix_weight = torch.exp(prefix_lse - lse).unsqueeze(-1)
        out = own.mul_(own_weight).addcmul_(prefix, prefix_weight)  # in the flash call's own output tensor
        ctx.save_for_backward(query, key, value, prefix_key, prefix_value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, prefix_key, prefix_value, out, lse = ctx.saved_tensors
        grad_query, grad_key, grad_value = _FLASH_BACKWARD(
            grad, query, key, value, out, lse, 0.0, True, scale=ctx.scale
        )
        grad_prefix_query, grad_prefix_key, grad_prefix_value = _FLASH_BACKWARD(
            grad, query, prefix_key, prefix_value, out, lse, 0.0, False, scale=ctx.scale
        )
        return grad_query.add_(grad_prefix_query), grad_key, grad_value, grad_prefix_key, grad_prefix_value, None

"""Causal self-attention for bf16 training on a CPU: matrix products over query blocks, probabilities kept.

torch's CPU flash attention (what SDPA runs there) keeps only each row's log-sum-exp and recomputes the
scores in backward, and runs well below the machine's matmul speed. `BlockedCausalAttention` does the same
attention as batched matrix products, in blocks of up to `BLOCK_ROWS` query rows, each against the keys up
to its last row only (about (n + 1) / 2n of the square for n blocks), the query heads that share a key head
together (grouped-query attention without repeating keys and values):

    forward   scores in fp32 (bf16 queries and keys upcast), scaled, masked, softmax in fp32; the
              probabilities kept in bf16, as flash attention on a GPU feeds them to its P V product
    backward  dV = P^T dO, dP = dO V^T in fp32, dS = P (dP - rowsum(P * dP)), dQ = dS K, dK = dS^T Q

so backward needs no scores, and no output either (flash attention keeps it for rowsum(dO * O), the same sum).
It costs memory: the probabilities, B x heads x ~T^2 / 2 x 2 bytes a layer (`saved_bytes`; SmolLM2, batch
4 x 256: 4.9 MB a layer where SDPA keeps 3.2 MB, +52 MB over 30 layers), so it runs only up to `MAX_LENGTH`
positions. `python benchmarks/attention.py` (SmolLM2's heads, batch 4, forward +
backward, 2 cores): bf16 0.44-0.63x SDPA's time from 128 to 512 positions (0.71x at 1024), gradients as
close to fp64 as SDPA's own bf16 ones; on an Intel Xeon with AMX, whose bf16 matmuls make SDPA fast, 0.55x at
128 positions and 0.86-1.00x from 256 to 512. A whole SmolLM2 LoRA step in bf16, 4 x 256, is in BENCHMARKS.md. In
fp32 (128-row blocks) a LoRA step gained 3.5% for twice the extra memory, so fp32 stays with SDPA.

Packed rows (`petune.train.data.pack`, `pack_batch`) run blocked too: there transformers passes a mask that is
causal within each example of a row (built from position ids that restart), `packed_segments` recognises it, and
each block's scores are masked by example as well (rows x keys per block, per batch row; the probabilities
outside an example are 0, so backward needs no change). Outside the blocked kernel's domain (fp32, longer rows,
a GPU) packed rows run SDPA once per example (`_per_example`) instead of over the whole row under the mask.

It takes a call only when all of these hold, and leaves every other call to SDPA: CPU, bf16, gradients
being recorded, causal with no mask or a packed rows' mask (no padding), query length = key length, one head
size for queries, keys and values, no dropout, 2 to `MAX_LENGTH` positions, and the kernels on (`PETUNE_KERNELS` not 0).
tests/kernels/test_attention.py checks it against SDPA (exact in fp32, to bf16 rounding in bf16) and where it
runs.

`sdpa_forward` is transformers' SDPA attention with that exception, registered with transformers'
`AttentionInterface` as `KERNEL_ATTENTION`; `petune.kernels.enable` switches a model from "sdpa" to it, the
prompt methods' packed attention (`petune.methods.prompt_learning.packed_pass`) calls it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

KERNEL_ATTENTION = "petune_sdpa"
BLOCK_ROWS = 64
MAX_LENGTH = 512
DTYPES = (torch.bfloat16,)
_SDPA_ONLY = ("softcap", "position_bias", "s_aux")  # attention variants the blocked kernel does not do


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether causal attention over these (B, heads, T, d) tensors runs blocked (see the module's doc)."""
    from petune.kernels import enabled_by_default

    length = query.shape[2]
    return (
        query.device.type == "cpu"
        and query.dtype in DTYPES
        and query.dtype == key.dtype == value.dtype
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
        and dropout == 0.0
        and key.shape[2] == length
        and 1 < length <= MAX_LENGTH
        and query.shape[1] % key.shape[1] == 0
        and query.shape[3] == key.shape[3] == value.shape[3]  # one head size (not MLA's wider keys)
        and enabled_by_default()
    )


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float = 0.0, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of (B, heads, T, d) queries over (B, kv_heads, T, d) keys and values: the blocked
    kernel where it applies, else SDPA. (B, heads, T, d) out."""
    if takes(query, key, value, dropout):
        return _blocked(query, key, value, scale)
    return F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )


def sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, but causal unmasked training calls in bf16 on a CPU run blocked."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    plain = causal and not any(kwargs.get(name) is not None for name in _SDPA_ONLY)
    segments = None
    if plain and attention_mask is not None and query.shape[2] == key.shape[2]:
        segments = packed_segments(attention_mask, query.shape[0], query.shape[2])
    if plain and takes(query, key, value, dropout) and (attention_mask is None or segments is not None):
        return _blocked(query, key, value, scaling, segments).transpose(1, 2).contiguous(), None
    if segments is not None and dropout == 0.0:
        return _per_example(query, key, value, segments, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _per_example(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Packed rows' attention (B, T, heads, d): causal SDPA over each example's own span, the work of its length
    squared, where SDPA under the block-diagonal mask computes every query against every key of the row (torch's
    CPU flash attention skips no masked block) and only then masks: a row of k equal examples costs k times less."""
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for row, spans in enumerate(segments):
        pieces, start = [], 0
        for length in torch.unique_consecutive(spans, return_counts=True)[1].tolist():
            span = (slice(row, row + 1), slice(None), slice(start, start + length))
            pieces.append(
                F.scaled_dot_product_attention(
                    query[span], key[span], value[span], is_causal=True, scale=scale, enable_gqa=gqa
                )
            )
            start += length
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous()


def _blocked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """`BlockedCausalAttention` with SDPA's default scale, 1 / sqrt(head size)."""
    out: torch.Tensor = BlockedCausalAttention.apply(
        query, key, value, query.shape[-1] ** -0.5 if scale is None else scale, segments
    )
    return out


def packed_segments(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """(B, T) index of the example each position belongs to, when the boolean (B or 1, 1, T, T) `mask` (True:
    attend) is causal attention within consecutive examples, as transformers builds it for packed rows; else None.

    An example starts where a position may not see the one before it; the mask must then equal
    "same example and not in the future" everywhere (an O(B T^2) comparison of booleans, once per layer). A padding
    mask, where padded positions may not see themselves, is told apart first by its diagonal alone.
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (length, length):
        return None
    if mask.shape[0] not in (1, batch):
        return None
    rows = mask[:, 0]
    if not bool(rows.diagonal(dim1=1, dim2=2).all()):  # a position that may not see itself is padding: O(B T)
        return None
    starts = ~rows.diagonal(offset=-1, dim1=1, dim2=2)  # (B, T - 1): position t + 1 does not see t
    segments = F.pad(starts.long().cumsum(-1), (1, 0))  # (B, T)
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril_()
    if not torch.equal(rows, (segments[:, :, None] == segments[:, None, :]) & causal):
        return None
    return segments.expand(batch, length)


def interface_config(model: nn.Module) -> Any:
    """The config of a text model whose attention goes through transformers' attention interface, else None."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return None
    return config if config.get_text_config() is config else None


def switch_attention(model: nn.Module, current: str, new: str) -> None:
    """Point a model whose attention goes through transformers' attention interface from `current` to `new`."""
    config = interface_config(model)
    if config is not None and config._attn_implementation == current:
        config._attn_implementation = new


AttentionInterface.register(KERNEL_ATTENTION, sdpa_forward)
AttentionMaskInterface.register(KERNEL_ATTENTION, sdpa_mask)


def saved_bytes(batch: int, heads: int, kv_heads: int, length: int, head_dim: int) -> int:
    """What one call keeps for backward in bf16: queries, keys and values, and the probabilities of every block
    (its rows x the keys up to its end, for each query head). Not the output: an output projection that trains
    keeps that as its input."""
    probabilities = sum((end - start) * end for start, end in _bounds(length))
    return 2 * batch * ((heads + 2 * kv_heads) * length * head_dim + heads * probabilities)


def _bounds(length: int) -> list[tuple[int, int]]:
    """(first row, end row) of each query block: as few blocks of at most `BLOCK_ROWS` rows as cover `length`."""
    count = -(-length // BLOCK_ROWS)
    ends = [round(length * (n + 1) / count) for n in range(count)]
    return list(zip([0, *ends[:-1]], ends, strict=True))


@functools.lru_cache(maxsize=64)
def _blocks(length: int, group: int) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """(first row, end row, additive causal mask) of each query block: the mask is the rows' over keys
    [0, end), repeated for the `group` query heads that share a key head."""
    blocks = []
    for start, end in _bounds(length):
        future = torch.ones(end - start, end, dtype=torch.bool).triu_(start + 1)
        mask = torch.zeros(end - start, end).masked_fill_(future, float("-inf"))
        blocks.append((start, end, mask.repeat(group, 1)))
    return tuple(blocks)


class BlockedCausalAttention(torch.autograd.Function):
    """softmax(scale Q K^T + causal mask) V for q (B, H, T, d) and k, v (B, KV, T, d), H a multiple of KV.

    The G = H / KV query heads that share a key head go through it together: one (G x rows, d) block of
    queries against (keys, d), so keys and values are never repeated per query head.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`segments` (B, T): each position's example in a packed row, attention staying inside it; None: one."""
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        q = query.reshape(batch, kv_heads, group, length, dim)
        k = key.reshape(batch * kv_heads, length, dim)
        v = value.reshape(batch * kv_heads, length, dim)
        # (B, H, T, d) on a (B, T, H, d) buffer: the layout the output projection takes, so that transformers'
        # transpose(1, 2).contiguous() after attention is free and one tensor serves it and this backward
        out = query.new_empty(batch, length, heads, dim)
        probs = []
        with torch.autocast("cpu", enabled=False):
            k32 = k.float()
            for start, end, mask in _blocks(length, group):
                if segments is not None:
                    mask = _segment_mask(segments, mask, start, end, kv_heads, group)
                rows = _gather(q, start, end, torch.float32)
                scores = torch.baddbmm(mask, rows, k32[:, :end].transpose(1, 2), alpha=scale)
                p = torch.softmax(scores, dim=-1).to(query.dtype)
                _scatter(torch.bmm(p, v[:, :end]), out, start, end)
                probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale = scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, *probs = ctx.saved_tensors
        batch, kv_heads, group, length, dim = q.shape
        grad_queries = grad.reshape(batch, kv_heads, group, length, dim)
        grad_q = torch.empty_like(q)
        grad_k = grad_v = k  # placeholders: the last block, which sees every key, writes them first
        v32 = v.float()
        for start, end, _ in reversed(_blocks(length, group)):
            p = probs.pop()
            rows, grad_rows = _gather(q, start, end), _gather(grad_queries, start, end)
            grad_p = torch.bmm(grad_rows.float(), v32[:, :end].transpose(1, 2))  # dP in fp32, as flash attention has it
            # dS = P (dP - rowsum(P dP)): the softmax's backward from the kept probabilities, without the scores
            # or the output (rowsum(P dP) = rowsum(dO O), which flash attention computes from a kept output)
            grad_s = grad_p.mul_(p)
            grad_s = grad_s.addcmul_(p, grad_s.sum(-1, keepdim=True), value=-1).mul_(ctx.scale).to(q.dtype)
            grad_q[:, :, :, start:end] = torch.bmm(grad_s, k[:, :end]).view(batch, kv_heads, group, end - start, dim)
            if end == length:
                grad_v = torch.bmm(p.transpose(1, 2), grad_rows)
                grad_k = torch.bmm(grad_s.transpose(1, 2), rows)
            else:
                grad_v[:, :end].baddbmm_(p.transpose(1, 2), grad_rows)
                grad_k[:, :end].baddbmm_(grad_s.transpose(1, 2), rows)
        kv_shape = (batch, kv_heads, length, dim)
        return grad_q.view(batch, -1, length, dim), grad_k.view(kv_shape), grad_v.view(kv_shape), None, None


def _segment_mask(
    segments: torch.Tensor, causal: torch.Tensor, start: int, end: int, kv_heads: int, group: int
) -> torch.Tensor:
    """The additive mask of query rows [start, end) over keys [0, end) for packed rows: `causal` (G x rows, end),
    plus -inf where key and query belong to different examples; (B x KV, G x rows, end), `_gather`'s layout."""
    batch = segments.shape[0]
    other = segments[:, start:end, None] != segments[:, None, :end]  # (B, rows, end)
    mask = causal.view(group, end - start, end).expand(batch, kv_heads, group, end - start, end)
    mask = mask.masked_fill(other[:, None, None], float("-inf"))
    return mask.reshape(batch * kv_heads, group * (end - start), end)


def _gather(tensor: torch.Tensor, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows [start, end) of (B, KV, G, T, x) as (B x KV, G x rows, x): one key head's queries, head after head."""
    batch, kv_heads, group, _, width = tensor.shape
    rows = tensor[:, :, :, start:end]
    return rows.to(dtype or rows.dtype).reshape(batch * kv_heads, group * (end - start), width)


def _scatter(block: torch.Tensor, out: torch.Tensor, start: int, end: int) -> None:
    """Write a (B x KV, G x rows, d) block into rows [start, end) of the (B, T, H, d) output."""
    batch, _, heads, dim = out.shape
    out[:, start:end] = block.view(batch, heads, end - start, dim).transpose(1, 2)

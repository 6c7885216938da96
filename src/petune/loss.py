"""Next-token loss that never materialises the full logits.

A causal LM's logits are (batch, seq, vocab) floats: for SmolLM2 (vocab 49,152) a batch of 4 x 256
tokens is 200 MB in fp32, and the loss keeps two more copies (log-softmax and its gradient). Only the
positions that carry a label need logits at all (with completion-only training, often a minority), and
those can be computed a chunk at a time under activation checkpointing, so one chunk's logits are alive
at once. The result is the same mean cross-entropy HF models compute from `labels=`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, Any],
    chunk_size: int = 256,
    num_items: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `batch["labels"]` (shifted by one, -100 ignored) under `model`.

    Args:
        model: a transformers causal LM or a `PeftModel` around one.
        batch: the forward's keyword arguments plus `labels` (batch, seq).
        chunk_size: label positions whose logits are computed at once.
        num_items: divide the summed loss by this (e.g. the label count of a whole accumulated batch)
            instead of this batch's label count.
    """
    labels: torch.Tensor = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inner = model.module if isinstance(model, DistributedDataParallel) else model  # DDP: hooks go on the model
    decoder: nn.Module = inner.get_decoder()  # type: ignore[operator]
    head: nn.Module = inner.get_output_embeddings()  # type: ignore[operator]
    captured: list[torch.Tensor] = []

    def keep_hidden(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    hook = decoder.register_forward_hook(keep_hidden)
    try:
        # logits_to_keep=1: the model's own head runs on one position only; we do the rest below.
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    hidden = captured[-1]  # (B, T', H); T' > T when a prompt method prepended virtual tokens
    if hidden.shape[1] > labels.shape[1]:
        labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
    shift_labels = labels[:, 1:].to(hidden.device)
    keep = shift_labels != IGNORE_INDEX
    selected = hidden[:, :-1][keep]  # (N, H)
    targets = shift_labels[keep]  # (N,)
    count = num_items if num_items is not None else int(targets.numel())
    if targets.numel() == 0:
        return hidden.sum() * 0.0

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(chunk_loss, selected[piece], targets[piece], use_reentrant=False)
    return total / max(count, 1)

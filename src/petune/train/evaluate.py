"""Held-out loss and perplexity, greedy generation, and exact-match / contains accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from petune.loss import causal_lm_loss
from petune.train.data import IGNORE_INDEX, Example, Record, collate


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over labelled tokens, number of those tokens).

    Summing (not averaging) lets the caller divide by the token count of the whole global batch, so
    a step means the same with any split into micro-batches or processes.
    """
    labels = batch["labels"].clone()  # (B, T)
    labels[:, 0] = IGNORE_INDEX  # no token before it predicts it: counts agree with `labels[:, 1:]` for every method
    loss = causal_lm_loss(model, {**batch, "labels": labels}, num_items=1)  # a sum, without the full logits
    targets = labels[:, 1:]
    return loss, (targets != IGNORE_INDEX).sum()


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    reduce: Any = None,
) -> dict[str, float]:
    """Mean loss per completion token and perplexity over `examples` (this process's share).

    `reduce(tensor)` sums a tensor over processes (data-parallel evaluation); None for one process.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()}
        loss_sum, tokens = token_loss_sum(model, batch)
        totals += torch.stack([loss_sum.double(), tokens.double()])
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(totals[1].item())}


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[tuple[str, bool]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations of `prompts` ((text, templated) pairs), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [tokenizer(text, add_special_tokens=not templated)["input_ids"] for text, templated in chunk]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)  # left padding
        attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
        generated = model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        outputs += [str(tokenizer.decode(row[width:], skip_special_tokens=True)).strip() for row in generated]
    model.train(was_training)
    return outputs


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match: prediction == reference (whitespace-trimmed); contains: the reference appears in it."""
    pairs = list(zip(predictions, references, strict=True))
    if not pairs:
        return {"exact_match": 0.0, "contains": 0.0}
    exact = sum(p.strip() == r.strip() for p, r in pairs)
    contains = sum(bool(r.strip()) and r.strip() in p for p, r in pairs)
    return {"exact_match": exact / len(pairs), "contains": contains / len(pairs)}


def accuracy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], batch_size: int = 16
) -> dict[str, Any]:
    """Generate an answer to each record's prompt and score it against the record's reference."""
    longest = max((len(tokenizer(r.reference, add_special_tokens=False)["input_ids"]) for r in records), default=0)
    predictions = generate(
        model, tokenizer, [(r.prompt, r.templated) for r in records], max_new_tokens=longest + 4, batch_size=batch_size
    )
    result: dict[str, Any] = score(predictions, [r.reference for r in records])
    result["count"] = len(records)
    result["predictions"] = predictions
    return result

"""`--objective dpo`: Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model", equation 7) on `{"prompt", "chosen", "rejected"}` records.

    loss = -log σ(β · ((log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))))

π is the model with its adapter, π_ref the same model with the adapter switched off (as peft and TRL do
for a PEFT model: no second copy of the weights), y_w the chosen and y_l the rejected completion; log π(y|x)
sums the completion's token log-probabilities (section 4). β · (log π - log π_ref) is the implicit reward
(section 5): its mean for chosen and rejected, their margin and how often chosen wins are logged as
`rewards/...`, as TRL names them. At initialisation a LoRA adapter computes what the base model does,
so π = π_ref and the loss is log 2.

Records: text (`"prompt": "...", "chosen": "...", "rejected": "..."`, each completion followed by EOS)
or TRL's conversational form (`prompt` a list of messages, `chosen`/`rejected` lists holding the
assistant's reply), rendered with the chat template like any chat record (data.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from petune.train import UserError
from petune.train.data import (
    IGNORE_INDEX,
    Dataset,
    Example,
    Record,
    collate,
    parse_record,
    read_rows,
    split_off,
    tokenize,
)
from petune.train.methods import as_base_model

FIELDS = ("prompt", "chosen", "rejected")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")  # TRL's names


@dataclass
class PreferencePair:
    """One prompt with a preferred and a dispreferred completion, tokenised (labels on the completion only)."""

    chosen: Example
    rejected: Example


def parse_pair(row: dict[str, Any], where: str, tokenizer: PreTrainedTokenizerBase) -> tuple[Record, Record]:
    """(chosen, rejected) records of a preference record; an error naming the record and the fields expected."""
    missing = [key for key in FIELDS if key not in row]
    if missing:
        raise UserError(f"{where}: a preference record needs prompt, chosen and rejected; it has {sorted(row)}")
    if isinstance(row["prompt"], list):  # conversational: the prompt's messages, then the assistant's reply
        return tuple(  # type: ignore[return-value]
            parse_record({"messages": [*row["prompt"], *_messages(row, key, where)]}, where, tokenizer)
            for key in ("chosen", "rejected")
        )
    return tuple(  # type: ignore[return-value]
        parse_record({"prompt": row["prompt"], "completion": row[key]}, where, tokenizer)
        for key in ("chosen", "rejected")
    )


def _messages(row: dict[str, Any], key: str, where: str) -> list[Any]:
    value = row[key]
    if not isinstance(value, list):
        raise UserError(f"{where}: with a conversational prompt (a list of messages), {key!r} must be a list too")
    return value


def load_preferences(
    tokenizer: PreTrainedTokenizerBase,
    data: str | None,
    val_data: str | None,
    val_fraction: float,
    max_length: int,
    seed: int = 0,
) -> Dataset:
    """Preference pairs for training and held out; the held-out records are the chosen answers (for generation)."""
    if data is None:
        raise UserError(
            "--objective dpo needs --data: a file of prompt/chosen/rejected records (the demo set has none)"
        )
    pairs = [parse_pair(row, where, tokenizer) for where, row in read_rows(data)]
    if val_data is not None:
        val_pairs = [parse_pair(row, where, tokenizer) for where, row in read_rows(val_data)]
    else:
        pairs, val_pairs = split_off(pairs, val_fraction, seed)
    train, truncated = _tokenize(pairs, tokenizer, max_length)
    val, _ = _tokenize(val_pairs, tokenizer, max_length)
    return Dataset(train, val, [chosen for chosen, _ in val_pairs], len(pairs), truncated)


def _tokenize(
    pairs: list[tuple[Record, Record]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[list[PreferencePair], int]:
    tokenized, truncated = [], 0
    for chosen, rejected in pairs:
        (chosen_example, cut_chosen), (rejected_example, cut_rejected) = (
            tokenize(record, tokenizer, max_length, train_on_prompt=False) for record in (chosen, rejected)
        )
        tokenized.append(PreferencePair(chosen_example, rejected_example))
        truncated += cut_chosen or cut_rejected
    return tokenized, truncated


def collate_pairs(pairs: Sequence[PreferencePair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2P rows: the P chosen examples, then the P rejected ones (one forward for both)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R,) log π(completion | prompt) of each row: the sum of its labelled tokens' log-probabilities.

    Only the labelled positions' logits go through log-softmax (in fp32). A prompt method's virtual tokens
    come first in the output, so the last T positions are the input's.
    """
    labels = batch["labels"]  # (R, T)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, -labels.shape[1] :]  # (R, T, V)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (R, T - 1)
    token_logps = -F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses (P,), summed reward metrics) from (2P,) log-probs ordered chosen rows, then rejected."""
    pairs = policy.shape[0] // 2
    chosen_rewards = beta * (policy[:pairs] - reference[:pairs])  # (P,)
    rejected_rewards = beta * (policy[pairs:] - reference[pairs:])
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    sums = [
        chosen_rewards.sum(),
        rejected_rewards.sum(),
        (chosen_rewards - rejected_rewards).sum(),
        (chosen_rewards > rejected_rewards).float().sum(),
    ]
    return losses, dict(zip(REWARDS, sums, strict=True))


class DpoObjective:
    """The training loop's view of DPO: batches of pairs, a loss summed over pairs, held-out DPO metrics."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    collate = staticmethod(collate_pairs)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """The loss is a mean over preference pairs."""
        return batch["input_ids"].shape[0] // 2

    def loss_sum(
        self, trained: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed DPO loss of the batch's pairs under `trained` (maybe DDP-wrapped `model`), and reward sums."""
        with torch.no_grad(), as_base_model(model):  # the reference: the same weights, adapter off
            reference = sequence_logps(model, batch)
        losses, metrics = dpo_loss(sequence_logps(trained, batch), reference, self.beta)
        return losses.sum(), metrics

    @torch.no_grad()
    def heldout(
        self,
        model: nn.Module,
        pairs: Sequence[PreferencePair],
        pad_token_id: int,
        batch_size: int,
        device: torch.device,
        reduce: Any = None,
    ) -> dict[str, float]:
        """Mean DPO loss and rewards over `pairs` (this process's share; `reduce` sums over processes)."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(2 + len(REWARDS), dtype=torch.float64, device=device)  # loss, rewards, pairs
        for start in range(0, len(pairs), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + batch_size], pad_token_id).items()}
            loss, metrics = self.loss_sum(model, model, batch)
            totals += torch.stack([loss, *metrics.values(), loss.new_tensor(self.units(batch))]).double()
        if reduce is not None:
            totals = reduce(totals)
        model.train(was_training)
        means = (totals[:-1] / totals[-1].clamp(min=1)).tolist()
        return {"loss": means[0], **dict(zip(REWARDS, means[1:], strict=True)), "pairs": int(totals[-1].item())}

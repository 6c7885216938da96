"""What a training step minimises: `--objective sft`, the next-token loss on completions, or `dpo`, a
preference loss on chosen/rejected pairs (dpo.py). One explicit table; the loop only calls the four
methods of `Objective`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from petune.train.config import TrainConfig
from petune.train.data import IGNORE_INDEX, Dataset, collate, load_dataset, pack_batch
from petune.train.dpo import DpoObjective, load_preferences
from petune.train.evaluate import heldout_loss, token_loss_sum


class Objective(Protocol):
    def collate(self, items: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        """A right-padded batch (input_ids, attention_mask, labels) of training items."""
        ...

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is a mean over: labelled tokens (sft), pairs (dpo)."""
        ...

    def loss_sum(
        self, trained: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over `units`, other metrics summed likewise) under `trained`, `model` maybe DDP-wrapped."""
        ...

    def heldout(
        self,
        model: nn.Module,
        items: Sequence[Any],
        pad_token_id: int,
        batch_size: int,
        device: torch.device,
        reduce: Any = None,
    ) -> dict[str, float]:
        """Held-out metrics ("loss" among them) over this process's share of the held-out items."""
        ...


@dataclass
class SftObjective:
    """Next-token cross-entropy on the completion tokens, a mean over the global batch's labelled tokens.
    `pack_length`: each micro-batch's examples go into shared rows of at most that many tokens (`pack_batch`)."""

    pack_length: int | None = None
    heldout = staticmethod(heldout_loss)

    def collate(self, items: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate(pack_batch(items, self.pack_length) if self.pack_length else items, pad_token_id)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def loss_sum(
        trained: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return token_loss_sum(trained, batch)[0], {}


def keeps_packed_examples_apart(model: nn.Module, device: torch.device) -> bool:
    """Whether `model`'s attention keeps examples that share a row apart, as transformers does for the families
    whose masks follow restarting position ids: the logits of two tokens packed after two others (positions
    0 1 0 1) are those of the two alone. An architecture that ignores the positions would let them attend back.
    Every process runs it (a sharded model's forward is collective)."""
    ids = torch.tensor([[11, 12, 13, 14]], device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # as training calls it: no cache (with one, transformers does not look for packed examples)
            positions = torch.tensor([[0, 1, 0, 1]], device=device)
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 2:]
            alone = model(input_ids=ids[:, 2:], position_ids=positions[:, 2:], use_cache=False).logits[0]
    finally:
        model.train(training)
    scale = alone.float().abs().max().clamp(min=1e-6)
    return bool((packed.float() - alone.float()).abs().max() <= 1e-2 * scale)


def objective_for(cfg: TrainConfig) -> Objective:
    if cfg.objective == "dpo":
        return DpoObjective(cfg.dpo.beta)
    return SftObjective(cfg.max_length if cfg.packs_batches else None)


def load_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """The run's training and held-out data, as the objective takes it."""
    if cfg.objective == "dpo":
        return load_preferences(tokenizer, cfg.data, cfg.val_data, cfg.val_fraction, cfg.max_length, cfg.seed)
    return load_dataset(
        tokenizer, cfg.data, cfg.val_data, cfg.val_fraction, cfg.max_length, cfg.train_on_prompt, cfg.packing, cfg.seed
    )

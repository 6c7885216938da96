"""What a training step minimises: `--objective sft`, the next-token loss on completions, or `dpo`, a
preference loss on chosen/rejected pairs (dpo.py). One explicit table; the loop only calls the four
methods of `Objective`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from petune.train.config import TrainConfig
from petune.train.data import IGNORE_INDEX, Dataset, collate, load_dataset
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


class SftObjective:
    """Next-token cross-entropy on the completion tokens, a mean over the global batch's labelled tokens."""

    collate = staticmethod(collate)
    heldout = staticmethod(heldout_loss)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @staticmethod
    def loss_sum(
        trained: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return token_loss_sum(trained, batch)[0], {}


def objective_for(cfg: TrainConfig) -> Objective:
    return DpoObjective(cfg.dpo.beta) if cfg.objective == "dpo" else SftObjective()


def load_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """The run's training and held-out data, as the objective takes it."""
    if cfg.objective == "dpo":
        return load_preferences(tokenizer, cfg.data, cfg.val_data, cfg.val_fraction, cfg.max_length, cfg.seed)
    return load_dataset(
        tokenizer, cfg.data, cfg.val_data, cfg.val_fraction, cfg.max_length, cfg.train_on_prompt, cfg.packing, cfg.seed
    )

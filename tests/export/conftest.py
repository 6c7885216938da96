"""Fixtures for the export tests: the tiny models of tests/train/tiny.py, and adapters on them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from petune import PeftConfig, get_peft_model
from tests.train.tiny import tiny_model_dir, tokenizer

__all__ = ["save_adapter", "tiny_model_dir", "tokenizer"]


def save_adapter(model_dir: Path, folder: Path, config: PeftConfig, seed: int = 3, scale: float = 1.0) -> Path:
    """A random adapter of `config` on the model in `model_dir`, its B factors times `scale`, saved to `folder`."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    wrapped = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    wrapped.save_pretrained(folder)
    return folder

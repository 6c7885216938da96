"""benchmarks/engines_peft.py, the HF PEFT side of the engine benchmark, runs petune train's settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from petune.train.config import build_config
from petune.train.methods import learning_rate
from petune.train.strategy import deepspeed_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import engines_peft


@pytest.mark.parametrize(("strategy", "batch_size", "world"), [("zero2", 2, 2), ("zero3", 4, 1)])
def test_the_peft_side_gets_petunes_deepspeed_config(strategy: str, batch_size: int, world: int) -> None:
    cfg = build_config({"strategy": strategy, "batch_size": batch_size})
    assert engines_peft.deepspeed_config(int(strategy[-1]), batch_size, world) == deepspeed_config(cfg, world)


def test_the_peft_side_trains_with_petunes_defaults() -> None:
    cfg = build_config({})
    assert cfg.schedule == "cosine" and cfg.weight_decay == 0.0 and cfg.grad_accum == 1
    petune = (learning_rate(cfg), cfg.warmup_steps, cfg.max_grad_norm, cfg.seed)
    assert petune == (engines_peft.LR, engines_peft.WARMUP, engines_peft.MAX_GRAD_NORM, engines_peft.SEED)
    lora = {"r": cfg.lora.r, "lora_alpha": cfg.lora.lora_alpha, "lora_dropout": cfg.lora.lora_dropout}
    assert lora == engines_peft.LORA

"""`--method NAME` -> the adapter config it trains (and, for qlora, a 4-bit base model).

One explicit table; the prompt-learning configs are imported when used, so a build without them still
trains the LoRA family.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from petune import LoraConfig, PeftConfig, TaskType
from petune.embedded import load_model_and_tokenizer
from petune.train import UserError
from petune.train.config import TrainConfig

LORA_FAMILY = ("lora", "dora", "rslora", "qlora")
DEFAULT_LR = {
    "lora": 2e-3,
    "dora": 2e-3,
    "rslora": 2e-3,
    "qlora": 2e-3,
    "prompt": 3e-2,
    "ptuning": 3e-2,
    "prefix": 3e-2,
}


def _lora(cfg: TrainConfig, model_path: str) -> PeftConfig:
    options = dataclasses.asdict(cfg.lora)
    if options["target_modules"] == ["all-linear"]:
        options["target_modules"] = "all-linear"  # HF PEFT's keyword is a string, not a module name
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        use_dora=cfg.method == "dora",
        use_rslora=cfg.method == "rslora",
        **options,
    )


def _prompt_config(class_name: str, method: str) -> Callable[..., PeftConfig]:
    try:
        config_class: Callable[..., PeftConfig] = getattr(importlib.import_module("petune"), class_name)
    except AttributeError:
        raise UserError(f"--method {method} needs petune.{class_name}, which this petune does not have") from None
    return config_class


def _prompt(cfg: TrainConfig, model_path: str) -> PeftConfig:
    options: dict[str, Any] = dataclasses.asdict(cfg.prompt)
    if options["prompt_tuning_init_text"]:
        options.update(prompt_tuning_init="TEXT", tokenizer_name_or_path=model_path)
    else:
        del options["prompt_tuning_init_text"]
    return _prompt_config("PromptTuningConfig", "prompt")(task_type=TaskType.CAUSAL_LM, **options)


def _ptuning(cfg: TrainConfig, model_path: str) -> PeftConfig:
    options = dataclasses.asdict(cfg.ptuning)
    return _prompt_config("PromptEncoderConfig", "ptuning")(task_type=TaskType.CAUSAL_LM, **options)


def _prefix(cfg: TrainConfig, model_path: str) -> PeftConfig:
    options = dataclasses.asdict(cfg.prefix)
    return _prompt_config("PrefixTuningConfig", "prefix")(task_type=TaskType.CAUSAL_LM, **options)


METHODS: dict[str, Callable[[TrainConfig, str], PeftConfig]] = {
    "lora": _lora,
    "dora": _lora,
    "rslora": _lora,
    "qlora": _lora,
    "prompt": _prompt,
    "ptuning": _ptuning,
    "prefix": _prefix,
}


def peft_config(cfg: TrainConfig, model_path: str) -> PeftConfig:
    """The adapter config `cfg.method` trains, from the method's option section."""
    try:
        return METHODS[cfg.method](cfg, model_path)
    except (TypeError, ValueError) as error:
        raise UserError(f"--method {cfg.method}: {error}") from None


def learning_rate(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]


def load_base(cfg: TrainConfig, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base model and its tokenizer; qlora loads the weights as 4-bit NF4 (bitsandbytes)."""
    extra: dict[str, Any] = {}
    if cfg.method == "qlora":
        extra["quantization_config"] = _four_bit(cfg, dtype)
    try:
        model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=dtype, **extra)
    except OSError as error:
        raise UserError(f"cannot load model {cfg.model!r}: {str(error).splitlines()[0]}") from None
    return model, tokenizer


def _four_bit(cfg: TrainConfig, dtype: torch.dtype) -> Any:
    """QLoRA's quantisation (Dettmers et al. 2023, section 3): NF4 storage, double quantisation."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--method qlora needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if cfg.qlora.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise UserError(f"--qlora.bnb_4bit_quant_type must be nf4 or fp4, got {cfg.qlora.bnb_4bit_quant_type!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.qlora.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.qlora.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
    )

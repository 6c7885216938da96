"""`--method NAME` -> what it trains: an adapter config (and, for qlora, a 4-bit base model), or for
`full` every weight of the base model itself.

One explicit table; the prompt-learning configs are imported when used, so a build without them still
trains the LoRA family. The rest of the training code asks the model, not the method name: a
`PeftModel` is an adapter run, a plain transformers model a full fine-tuning run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from petune import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from petune.embedded import load_model_and_tokenizer
from petune.train import UserError
from petune.train.config import TrainConfig

LORA_FAMILY = ("lora", "dora", "rslora", "qlora")


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
    elif str(options["prompt_tuning_init"]).upper() == "TEXT":
        raise UserError("--prompt.prompt-tuning-init TEXT needs --prompt.prompt-tuning-init-text (the text)")
    else:
        del options["prompt_tuning_init_text"]
    return _prompt_config("PromptTuningConfig", "prompt")(task_type=TaskType.CAUSAL_LM, **options)


def _ptuning(cfg: TrainConfig, model_path: str) -> PeftConfig:
    options = dataclasses.asdict(cfg.ptuning)
    return _prompt_config("PromptEncoderConfig", "ptuning")(task_type=TaskType.CAUSAL_LM, **options)


def _prefix(cfg: TrainConfig, model_path: str) -> PeftConfig:
    options = dataclasses.asdict(cfg.prefix)
    return _prompt_config("PrefixTuningConfig", "prefix")(task_type=TaskType.CAUSAL_LM, **options)


def _section(cfg: TrainConfig, section: str, class_name: str, **fixed: Any) -> PeftConfig:
    """The adapter config `class_name` built from option section `section` (a list ["all-linear"] made a string)
    and the `fixed` values the run decides."""
    options = {**dataclasses.asdict(getattr(cfg, section)), **fixed}
    if options.get("target_modules") == ["all-linear"]:
        options["target_modules"] = "all-linear"
    return _prompt_config(class_name, cfg.method)(task_type=TaskType.CAUSAL_LM, **options)


def _ia3(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "ia3", "IA3Config")


def _ln_tuning(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "ln_tuning", "LNTuningConfig")


def _loha(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "loha", "LoHaConfig")


def _lokr(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "lokr", "LoKrConfig")


def _vera(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "vera", "VeraConfig")


def _hra(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "hra", "HRAConfig")


def _fourierft(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "fourierft", "FourierFTConfig")


def _oft(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "oft", "OFTConfig")


def _boft(cfg: TrainConfig, model_path: str) -> PeftConfig:
    return _section(cfg, "boft", "BOFTConfig")


def _adalora(cfg: TrainConfig, model_path: str) -> PeftConfig:
    """AdaLoRA over the whole run: total_step is --max-steps; tinit and tfinal default to a tenth and a fifth."""
    options = cfg.adalora
    tinit = cfg.max_steps // 10 if options.tinit is None else options.tinit
    tfinal = cfg.max_steps // 5 if options.tfinal is None else options.tfinal
    return _section(cfg, "adalora", "AdaLoraConfig", total_step=cfg.max_steps, tinit=tinit, tfinal=tfinal)


@dataclass(frozen=True)
class Method:
    """A `--method`: its default peak learning rate, and the adapter config it builds from `(cfg, model
    path)`; no adapter (None) is full fine-tuning, where every parameter of the base model trains."""

    lr: float
    adapter: Callable[[TrainConfig, str], PeftConfig] | None


METHODS: dict[str, Method] = {
    "full": Method(1e-4, None),
    "lora": Method(2e-3, _lora),
    "dora": Method(2e-3, _lora),
    "rslora": Method(2e-3, _lora),
    "qlora": Method(2e-3, _lora),
    "prompt": Method(3e-2, _prompt),
    "ptuning": Method(1e-2, _ptuning),  # 35% exact match at 20 x 8 vs 1.7% at 3e-2 (BENCHMARKS.md)
    "prefix": Method(2e-3, _prefix),  # with its projection MLP: 88.3% exact match at 20 x 8 (BENCHMARKS.md)
    "ia3": Method(1e-2, _ia3),
    "ln_tuning": Method(1e-2, _ln_tuning),
    "loha": Method(2e-3, _loha),
    "lokr": Method(2e-3, _lokr),
    "vera": Method(1e-2, _vera),
    "hra": Method(2e-3, _hra),
    "fourierft": Method(1e-2, _fourierft),
    "oft": Method(5e-3, _oft),
    "boft": Method(5e-3, _boft),
    "adalora": Method(1e-2, _adalora),
}


def peft_config(cfg: TrainConfig, model_path: str) -> PeftConfig | None:
    """The adapter config `cfg.method` trains, from the method's option section; None for full fine-tuning."""
    make = METHODS[cfg.method].adapter
    try:
        return None if make is None else make(cfg, model_path)
    except (TypeError, ValueError) as error:
        raise UserError(f"--method {cfg.method}: {error}") from None


def loss_penalty(model: nn.Module) -> torch.Tensor | None:
    """A term the method adds to the training loss once per optimizer step (AdaLoRA's orthogonality
    regulariser), or None."""
    return model.loss_penalty() if isinstance(model, PeftModel) else None


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """What a method does after optimizer step `step` (0-based), gradients still in place: AdaLoRA reallocates
    its ranks (HF PEFT's `update_and_allocate`)."""
    if isinstance(model, PeftModel) and model.allocates_ranks:
        model.update_and_allocate(step)


def training_state(model: nn.Module) -> dict[str, Any]:
    """What the method carries between steps besides the trained tensors (AdaLoRA's importance scores), for a
    checkpoint; empty for the others."""
    return model.training_state() if isinstance(model, PeftModel) else {}


def load_training_state(model: nn.Module, state: dict[str, Any]) -> None:
    if isinstance(model, PeftModel):
        model.load_training_state(state)


PREFIX_TABLE_LR = 3e-2  # prefix tuning without its projection MLP (the bare table; 2e-3 is the MLP's rate)


def learning_rate(cfg: TrainConfig) -> float:
    if cfg.lr is not None:
        return cfg.lr
    if cfg.method == "prefix" and not cfg.prefix.prefix_projection:
        return PREFIX_TABLE_LR
    return METHODS[cfg.method].lr


def trainable_model(cfg: TrainConfig, base: PreTrainedModel, model_path: str) -> PeftModel | PreTrainedModel:
    """The model the optimizer trains: `base` with the method's adapter, or `base` itself, all of it trainable."""
    config = peft_config(cfg, model_path)
    if cfg.gradient_checkpointing:
        enable_checkpointing(base)
    if config is None:
        return base.requires_grad_(True)
    return get_peft_model(base, config)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in backward, non-reentrant: it needs no input that requires grad, and
    prefix tuning's projection and prompt methods' batch-of-one virtual pass (outside training) work under it."""
    if not model.supports_gradient_checkpointing:
        name = type(model).__name__
        raise UserError(f"{name} does not support gradient checkpointing; drop --gradient-checkpointing")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights (embedding = output head) count once."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()  # counts 4-bit weights at their unpacked size
    params = list(model.parameters())  # unique tensors
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in params]  # ZeRO-3: a shard's whole size
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


def as_base_model(model: nn.Module) -> AbstractContextManager[Any]:
    """A block in which `model`, not yet trained, computes what the base model does: an adapter is switched
    off (a prompt method's random virtual tokens would change the output); a full run's model is the base."""
    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


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
    # Sharded (the Answer.AI FSDP + QLoRA recipe): the packed 4-bit weights stored in the compute dtype, so that
    # the engine partitions them like the other frozen tensors; bitsandbytes' own uint8 storage otherwise.
    storage = {} if cfg.strategy == "ddp" else {"bnb_4bit_quant_storage": dtype}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.qlora.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.qlora.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
        **storage,
    )

"""`Setup`: what one planned training step does — method, precision, batch, sequence, checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petune.train import UserError

# "full" is the reference the PEFT methods are measured against; the rest are `petune train --method` names.
LAYER_METHODS = ("ia3", "ln_tuning", "loha", "lokr", "vera", "hra", "fourierft", "oft", "boft", "adalora")
METHODS = ("full", "lora", "dora", "rslora", "qlora", "prompt", "ptuning", "prefix", *LAYER_METHODS)
LORA_FAMILY = ("lora", "dora", "rslora", "qlora")
PROMPT_METHODS = ("prompt", "ptuning", "prefix")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Lightning's precision names. fp32: everything 4 bytes. bf16-mixed (ZeRO, Rajbhandari et al. 2020, section
# 3.1): 16-bit weights, gradients and activations, fp32 master weights kept by the optimizer. bf16-true:
# 16-bit everything, no master copy (QLoRA's recipe for its adapters). fp16 has the sizes of bf16.
PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")

# Bytes of AdamW's two moments per trainable parameter: fp32 (torch, bitsandbytes' 32-bit paged AdamW),
# bf16 (torch's AdamW on bf16 parameters), 8bit (Dettmers et al. 2022, block-wise 8-bit states).
OPTIMIZER_STATES = {"fp32": 8, "bf16": 4, "8bit": 2}


@dataclass(frozen=True)
class Setup:
    """One training step to plan. Defaults: `petune train`'s adapter options, bf16 mixed precision, batch 1 x 512."""

    method: str = "lora"
    precision: str = "bf16-mixed"
    optimizer_state: str = "fp32"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # or LINEAR_NAMES for all-linear
    virtual_tokens: int = 20
    encoder_hidden_size: int = 128  # p-tuning's MLP, or prefix tuning's projection MLP
    prefix_projection: bool = False  # prefix tuning: the prefix comes from a (V, kv width) table through an MLP
    loss_chunk: int = 256  # label positions whose logits petune's loss computes at once (petune.loss.CHUNK_SIZE)
    options: Any = None  # LAYER_METHODS: the method's `petune train` option section; None: train's defaults
    strategy: str = "ddp"  # how `nproc` devices share the model (petune.plan.sharding)
    nproc: int = 1
    offload: str = "none"

    def __post_init__(self) -> None:
        choices = {"method": METHODS, "precision": PRECISIONS, "optimizer_state": tuple(OPTIMIZER_STATES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"--{_flag(name)} {getattr(self, name)!r} is unknown; choose one of: {', '.join(allowed)}"
                )
        for name in ("batch_size", "seq_len", "lora_r", "virtual_tokens", "encoder_hidden_size", "loss_chunk"):
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        from petune.plan.sharding import check

        check(self.strategy, self.nproc, self.offload)
        unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
        if unknown or not self.lora_targets:
            raise UserError(
                f"--lora-targets: unknown layer(s) {', '.join(unknown) or '(none)'}; "
                f"use all-linear or names from: {', '.join(LINEAR_NAMES)}"
            )

    @property
    def adapted(self) -> tuple[str, ...]:
        """The linear layers that get an adapter (none outside the LoRA family)."""
        return self.lora_targets if self.method in LORA_FAMILY else ()

    @property
    def method_options(self) -> Any:
        """The option section (`petune train`'s, e.g. `OftOptions`) a method of LAYER_METHODS is planned with."""
        from petune.train.config import TrainConfig

        return self.options if self.options is not None else getattr(TrainConfig(), self.method)

    @property
    def virtual_in_input(self) -> int:
        """Virtual tokens prepended to every sequence (prompt tuning, p-tuning); prefix tuning's go to the cache."""
        return self.virtual_tokens if self.method in ("prompt", "ptuning") else 0

    @property
    def virtual_in_cache(self) -> int:
        """Virtual key/value positions every layer attends to (prefix tuning)."""
        return self.virtual_tokens if self.method == "prefix" else 0


def parse_targets(text: str) -> tuple[str, ...]:
    """`q_proj,v_proj` or `all-linear` as the tuple of layer names `Setup.lora_targets` holds."""
    if text.strip().lower() in ("all-linear", "all"):
        return LINEAR_NAMES
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _flag(name: str) -> str:
    return name.replace("_", "-")

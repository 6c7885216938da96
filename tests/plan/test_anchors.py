"""The built-in table reproduces the published numbers the brief's argument rests on (ratios, not exact GB)."""

from __future__ import annotations

import pytest

from petune.plan import ARCHITECTURES, Setup, named_device, plan
from petune.plan.gpus import GIB, Device
from petune.plan.setup import LINEAR_NAMES

BIG_GPU = Device("8 x 80GB", "cuda", 640 * GIB)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp32"])
def test_full_fine_tuning_with_adamw_holds_16_bytes_per_parameter(precision: str) -> None:
    """ZeRO (Rajbhandari et al. 2020), section 3.1: mixed-precision Adam keeps 2 + 2 + 12 = 16 bytes per
    parameter (fp16 weights and gradients; fp32 master weights, momentum and variance). fp32 also gives 16."""
    arch = ARCHITECTURES["llama-2-7b"]
    result = plan(arch, Setup(method="full", precision=precision), BIG_GPU)
    assert result.peak_phase == "optimizer step"  # batch 1 x 512: the model states dominate
    states = sum(result.components[k] for k in ("frozen_weights", "trainable_weights", "gradients", "optimizer_state"))
    assert states / result.trainable_params == 16
    assert result.trainable_params == result.total_params == 6_738_415_616


def test_qlora_fine_tunes_a_65b_model_on_one_48gb_gpu() -> None:
    """QLoRA (Dettmers et al. 2023), abstract: "finetune a 65B parameter model on a single 48GB GPU". Their
    setup: NF4 with double quantisation, LoRA r=64 on every linear layer, adapters in bf16 with 32-bit paged
    AdamW, gradient checkpointing, batch 1; 512 tokens."""
    setup = Setup(
        method="qlora",
        precision="bf16-true",
        optimizer_state="fp32",
        lora_r=64,
        lora_targets=LINEAR_NAMES,
        batch_size=1,
        seq_len=512,
        gradient_checkpointing=True,
    )
    result = plan(ARCHITECTURES["llama-65b"], setup, named_device("a6000"))
    assert result.fits
    assert 40 * GIB < result.total_bytes < 48 * GIB
    # the 4-bit base is most of it: 65B x 4.127 bits is about 31 GiB of linear weights
    assert result.components["frozen_weights"] / result.total_bytes > 0.7


def test_16_bit_full_fine_tuning_of_65b_needs_more_than_780_gb() -> None:
    """QLoRA, introduction: 16-bit fine-tuning of LLaMA 65B "requires more than 780 GB of GPU memory" (16-bit
    weights and gradients, 32-bit Adam moments: 12 bytes per parameter; decimal GB)."""
    setup = Setup(method="full", precision="bf16-true", optimizer_state="fp32", gradient_checkpointing=True)
    result = plan(ARCHITECTURES["llama-65b"], setup, BIG_GPU)
    assert result.total_bytes > 780e9
    assert result.total_bytes < 800e9  # and not much more: the model states are all of it


@pytest.mark.parametrize("optimizer_state", ["bf16", "fp32"])
def test_lora_makes_7b_training_several_times_cheaper(optimizer_state: str) -> None:
    """LoRA (Hu et al. 2021), abstract and section 4.2: GPU memory down 3x (GPT-3 175B: 1.2 TB -> 350 GB); the
    brief: a 7B model ~4x cheaper. With 16-bit training, full fine-tuning / LoRA on Llama-2 7B is 3-6x
    (bf16 moments: the LoRA paper's 3x; fp32 moments: more), and more with fp32 master weights."""
    arch, device = ARCHITECTURES["llama-2-7b"], named_device("a100-80gb")
    common = {"precision": "bf16-true", "optimizer_state": optimizer_state, "batch_size": 1, "seq_len": 512}
    full = plan(arch, Setup(method="full", **common), device)
    lora = plan(arch, Setup(method="lora", **common), device)
    ratio = full.total_bytes / lora.total_bytes
    assert 3 <= ratio <= 6
    assert lora.fits and lora.total_bytes < 24 * GIB  # LoRA on 7B: a consumer card
    mixed = plan(arch, Setup(method="full", precision="bf16-mixed"), device)
    assert mixed.total_bytes / plan(arch, Setup(method="lora", precision="bf16-mixed"), device).total_bytes > ratio
    assert not mixed.fits  # full fine-tuning of 7B does not fit even an 80 GB A100


def test_peft_makes_65b_trainable_where_full_fine_tuning_is_not() -> None:
    arch, device = ARCHITECTURES["llama-65b"], named_device("a100-80gb")
    assert not plan(arch, Setup(method="full"), device).fits
    assert not plan(arch, Setup(method="lora", gradient_checkpointing=True), device).fits  # 16-bit base: 122 GiB
    assert plan(arch, Setup(method="qlora", gradient_checkpointing=True), device).fits

"""Issue 21's methods on a 4-bit NF4 base where HF PEFT 0.21 supports one (its bitsandbytes layers exist for
IA3 and AdaLoRA among them): adapters cross both ways with peft's logits on the same 4-bit base, and train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import petune
from tests.test_qlora import IDS, model_dir, train_losses

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

__all__ = ["model_dir"]  # the module's fixture: a tiny Llama saved once


def load_4bit(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """fp32 compute for the comparisons with peft: its 4-bit IA3 layer returns fp32 keys and values in a bf16
    model (outside autocast), which SDPA refuses; petune's trains in bf16 too (below)."""
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4, dtype=dtype)


def standard_path(model: Any) -> Any:
    """`model` with bitsandbytes' bf16 CPU path off. On a CPU with AVX512-BF16 bitsandbytes repacks a 4-bit weight
    at its first inference forward and multiplies in bf16 from then on (`support_avx512bf16_for_cpu`): peft's
    logits then differ from the fp32 path by ~2e-3. petune keeps the standard layout (`keep_4bit_layers_trainable`:
    the repacked one does not train), so the comparison with peft runs its side on that path too."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def config(lib: Any, method: str) -> Any:
    if method == "ia3":
        return lib.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return lib.AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10, tinit=2, tfinal=2)


def randomised(model: Any) -> Any:
    """Trained-looking adapter values (both libraries start from the identity: ones, or zero B and E)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(1 + 0.5 * torch.randn_like(param) if "ia3" in name else 0.3 * torch.randn_like(param))
    return model


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return bool((ours - theirs).abs().max() <= 1e-4)


@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_adapters_on_a_4bit_base_cross_both_ways(model_dir: Path, tmp_path: Path, method: str) -> None:
    ours = randomised(petune.get_peft_model(load_4bit(model_dir), config(petune, method))).eval()
    layer = ours.base_model.model.layers[0].self_attn.v_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    ours.save_pretrained(tmp_path / "ours")
    theirs = standard_path(peft.PeftModel.from_pretrained(load_4bit(model_dir), tmp_path / "ours")).eval()
    with torch.no_grad():
        expected, base = ours(IDS).logits.float(), load_4bit(model_dir)(IDS).logits.float()
        assert not close(expected, base), "the adapter changes nothing: the test would prove nothing"
        assert close(expected, theirs(IDS).logits.float())

    theirs = standard_path(randomised(peft.get_peft_model(load_4bit(model_dir), config(peft, method)))).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = petune.PeftModel.from_pretrained(load_4bit(model_dir), tmp_path / "theirs").eval()
    with torch.no_grad():
        got = loaded(IDS).logits.float()
        assert not close(got, base) and close(got, theirs(IDS).logits.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ia3", "adalora"])
def test_adapters_on_a_4bit_base_train_in_fp32(model_dir: Path, method: str, dtype: torch.dtype) -> None:
    model = petune.get_peft_model(load_4bit(model_dir, dtype), config(petune, method)).train()
    losses = train_losses(model, lr=5e-2, after_step=model.update_and_allocate if method == "adalora" else None)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

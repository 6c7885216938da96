"""LoRA on a 4-bit NF4 base (QLoRA) through bitsandbytes, which runs on CPU as well as CUDA."""

import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import petune
from petune.methods.lora.layer import LoraLayer
from petune.quantization import dequantize_4bit

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

NF4 = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4, dtype=torch.bfloat16)


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def train_losses(model, lr, steps=5, after_step=None):
    """The loss of each of `steps` AdamW steps on IDS; `after_step(step)` after each optimizer step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_dequantised_weight_survives_cpu_repacking(model_dir):
    layer = load_4bit(model_dir).model.layers[0].self_attn.q_proj
    before = dequantize_4bit(layer.weight).clone()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)  # on CPU this repacks the weight in place
    after = dequantize_4bit(layer.weight)
    torch.testing.assert_close(after, before)
    # And the dense weight is the one the 4-bit kernel multiplies by.
    torch.testing.assert_close(y.float(), x.float() @ after.float().T, atol=2e-2, rtol=2e-2)


def test_qlora_matches_peft_and_trains(model_dir, tmp_path):
    torch.manual_seed(0)
    model = petune.get_peft_model(load_4bit(model_dir), petune.LoraConfig(r=4, init_lora_weights=False))
    assert isinstance(model.base_model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ours = model(IDS).logits.float()
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_4bit(model_dir), tmp_path)(IDS).logits.float()
    assert (ours - theirs).abs().max() <= 2e-2 * ours.abs().max()

    losses = train_losses(model, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_into_4bit_base_dequantises_and_keeps_the_output(model_dir, use_dora):
    torch.manual_seed(0)
    config = petune.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear", use_dora=use_dora)
    model = petune.get_peft_model(load_4bit(model_dir), config)
    unmerged = model(IDS).logits.float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    assert any("dequantised" in str(w.message) for w in caught)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, LoraLayer | bnb.nn.Linear4bit) for m in merged.modules())
    # bf16 rounding of the merged weight is the only error left: a few percent of the logit scale at most.
    error = (merged(IDS).logits.float() - unmerged).abs().max()
    assert error <= 3e-2 * unmerged.abs().max(), error


def test_adapters_below_a_repacked_4bit_layer_still_learn(model_dir):
    base = load_4bit(model_dir)
    with torch.no_grad():
        base(IDS)  # eval mode, no grad: bitsandbytes repacks every 4-bit weight for its CPU kernel
    model = petune.get_peft_model(base, petune.LoraConfig(r=4, target_modules=["q_proj"]))
    model.train()
    model(IDS, labels=IDS).loss.backward()
    # q_proj of layer 0 sits below every other 4-bit layer: its B gets a gradient only if they pass one on.
    for layer in model.base_model.model.layers:
        grad = layer.self_attn.q_proj.adapters["default"].lora_B.weight.grad
        assert grad is not None and grad.abs().sum() > 0

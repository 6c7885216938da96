"""The LoRA layer against hand-written formulas: LoRA, rsLoRA, DoRA, Conv1D, PiSSA, patterns and LoRA+."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from petune import LoraConfig, create_loraplus_optimizer, get_peft_model
from petune.layers import adapter_layers
from petune.methods.lora import LoraAdapter, LoraLayer

IN_FEATURES, OUT_FEATURES, RANK, ALPHA = 6, 5, 2, 3.0


class OneLayer(nn.Module):
    """A single linear layer (`nn.Linear`, or GPT-2's `Conv1D` whose weight is stored (in, out))."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        self.proj = Conv1D(OUT_FEATURES, IN_FEATURES) if conv1d else nn.Linear(IN_FEATURES, OUT_FEATURES)
        with torch.no_grad():
            for param in self.proj.parameters():
                param.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.proj(x)
        return result


def wrapped_layer(conv1d: bool, **kwargs: Any) -> tuple[nn.Module, LoraLayer, torch.Tensor, torch.Tensor]:
    """(peft model, its LoRA layer, W as (out, in), bias), with random A and B."""
    torch.manual_seed(0)
    base = OneLayer(conv1d)
    weight = (base.proj.weight.T if conv1d else base.proj.weight).detach().clone()
    bias = base.proj.bias.detach().clone()
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False, **kwargs)
    with pytest.warns(UserWarning, match="fan_in_fan_out") if conv1d else _no_warning():
        model = get_peft_model(base, config)
    layer = model.base_model.proj
    assert isinstance(layer, LoraLayer)
    return model, layer, weight, bias


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def adapter(layer: LoraLayer) -> LoraAdapter:
    result = layer.adapters["default"]
    assert isinstance(result, LoraAdapter)
    return result


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_is_w_x_plus_scaled_b_a_x(conv1d: bool, rslora: bool) -> None:
    model, layer, weight, bias = wrapped_layer(conv1d, use_rslora=rslora)
    a, b = adapter(layer).lora_A.weight, adapter(layer).lora_B.weight
    scaling = ALPHA / math.sqrt(RANK) if rslora else ALPHA / RANK
    x = torch.randn(3, 4, IN_FEATURES)
    expected = x @ weight.T + bias + scaling * (x @ a.T @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_dora_forward_is_magnitude_times_direction(conv1d: bool) -> None:
    model, layer, weight, bias = wrapped_layer(conv1d, use_dora=True)
    lora = adapter(layer)
    assert lora.lora_magnitude_vector is not None
    scaled = weight + (ALPHA / RANK) * lora.lora_B.weight @ lora.lora_A.weight
    torch.testing.assert_close(lora.lora_magnitude_vector.detach(), scaled.norm(dim=1), rtol=0, atol=1e-6)
    with torch.no_grad():
        lora.lora_magnitude_vector.mul_(torch.linspace(0.5, 2.0, OUT_FEATURES))  # as if trained
    x = torch.randn(3, IN_FEATURES)
    magnitude = lora.lora_magnitude_vector.detach()
    expected = (x @ scaled.T) * (magnitude / scaled.norm(dim=1)) + bias  # Liu et al. 2024, eq. 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        merged = layer.base_layer.weight.T if conv1d else layer.base_layer.weight
        torch.testing.assert_close(merged, scaled * (magnitude / scaled.norm(dim=1)).unsqueeze(1), rtol=0, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(layer.base_weight(), weight, rtol=0, atol=1e-5)


def test_dropout_only_acts_in_training() -> None:
    model, _, _, _ = wrapped_layer(False, lora_dropout=0.5)
    reference, _, _, _ = wrapped_layer(False)
    x = torch.randn(64, IN_FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)
        assert not torch.allclose(model.train()(x), reference(x))


@pytest.mark.parametrize(("arch", "init"), [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "pissa_niter_4")])
def test_pissa_keeps_the_output_and_holds_the_top_singular_directions(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: dict[str, torch.Tensor],
    arch: str,
    init: str,
) -> None:
    original = make_model(arch)
    target = "q_proj" if arch == "llama" else "c_attn"
    model = get_peft_model(make_model(arch), LoraConfig(r=4, target_modules=[target], init_lora_weights=init))
    torch.testing.assert_close(output_of(model, batch), output_of(original, batch), rtol=0, atol=1e-5)
    for name, layer in adapter_layers(model.base_model):
        assert isinstance(layer, LoraLayer)
        weight = original.get_submodule(name).weight.detach()
        weight = weight.T if arch == "gpt2" else weight
        delta = adapter(layer).delta_weight().detach()
        torch.testing.assert_close(layer.base_weight() + delta, weight, rtol=0, atol=1e-5)
        if init == "pissa":  # the exact SVD: s B A is the best rank-4 approximation of W
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            torch.testing.assert_close(delta, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=0, atol=1e-5)


def test_default_and_gaussian_init(make_model: Callable[..., nn.Module]) -> None:
    for init, check in ((True, lambda a: a.abs().max() > 0), ("gaussian", lambda a: abs(a.std() - 1 / 8) < 0.03)):
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), LoraConfig(r=8, target_modules=["up_proj"], init_lora_weights=init))
        for _, layer in adapter_layers(model.base_model):
            assert isinstance(layer, LoraLayer)
            assert torch.count_nonzero(adapter(layer).lora_B.weight) == 0
            assert check(adapter(layer).lora_A.weight.detach()), init


def test_rank_and_alpha_patterns_match_hf_peft(make_model: Callable[..., nn.Module]) -> None:
    config: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "o_proj"],
        "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        "alpha_pattern": {"o_proj": 3, "q_proj": 12},
        "use_rslora": True,
    }
    ours = get_peft_model(make_model("llama"), LoraConfig(**config))
    theirs = peft.get_peft_model(make_model("llama"), peft.LoraConfig(**config))
    expected = {
        n.removeprefix("base_model.model."): (m.r["default"], round(m.scaling["default"], 6))
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    layers = [(n, adapter(m)) for n, m in adapter_layers(ours.base_model) if isinstance(m, LoraLayer)]
    got = {n: (lora.r, round(lora.scaling, 6)) for n, lora in layers}
    assert got == expected
    assert got["model.layers.1.self_attn.q_proj"] == (6, round(12 / math.sqrt(6), 6))


def test_loraplus_gives_b_the_higher_learning_rate(make_model: Callable[..., nn.Module]) -> None:
    model = get_peft_model(make_model("llama", "seq_cls"), LoraConfig(task_type="SEQ_CLS", r=4, use_dora=True))
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(lr_of) == sorted(id(p) for p in trainable.values())  # each trainable parameter once, nothing else
    for name, param in trainable.items():
        assert lr_of[id(param)] == pytest.approx(16e-3 if ".lora_B." in name else 1e-3), name
    assert any(".lora_B." in n for n in trainable) and any(".score." in n for n in trainable)
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)

"""Prefix tuning: sizes under grouped-query attention, gradient checkpointing, and loading onto a wrong model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import petune
from petune import PrefixTuningConfig
from petune.methods.prefix_tuning import PrefixCache
from petune.methods.prefix_tuning import model as prefix_model
from petune.methods.prompt_learning import packed_pass
from tests.methods.prompt_helpers import ARCHS, VIRTUAL, tiny_model, wrap

# transformers 5 renamed gradient_checkpointing_enable; the old name is what HF PEFT users call
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def test_sizes_follow_grouped_query_attention() -> None:
    """4 query heads share 2 key/value heads of width 8: the prefix is kv-sized, as HF PEFT writes it."""
    config = wrap(petune, "qwen2", "prefix").peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_layer_sees_a_prefix_of_kv_heads(arch: str) -> None:
    model = wrap(petune, arch, "prefix_projection")
    seen: list[Any] = []
    model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cache"]), with_kwargs=True
    )
    model(input_ids=torch.randint(3, 100, (3, 5)), use_cache=False)
    (cache,) = seen
    assert isinstance(cache, PrefixCache) and cache.get_seq_length() == VIRTUAL
    heads = 2 if arch != "gpt2" else 4
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(3, heads, VIRTUAL, 8)] * 2


def prefix_grads(arch: str, variant: str, checkpointing: dict[str, bool] | None) -> torch.Tensor:
    model = wrap(petune, arch, variant)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    attention = next(m for name, m in model.base_model.named_modules() if name.endswith("attn"))
    calls = []
    attention.register_forward_pre_hook(lambda *args: calls.append(1))
    input_ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    model(input_ids=input_ids, attention_mask=mask, labels=input_ids).loss.backward()
    assert len(calls) == (2 if checkpointing is not None else 1)  # checkpointing reran the layer
    return torch.cat([param.grad.flatten() for param in model.adapter_modules.parameters()])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["prefix", "prefix_projection"])
def test_gradient_checkpointing_gives_the_same_gradients(arch: str, variant: str) -> None:
    expected = prefix_grads(arch, variant, None)
    assert expected.abs().max() > 0
    assert torch.allclose(prefix_grads(arch, variant, {"use_reentrant": False}), expected, atol=1e-7)


def test_reentrant_checkpointing_works_without_projection_and_refuses_it_with() -> None:
    expected = prefix_grads("llama", "prefix", None)
    assert torch.allclose(prefix_grads("llama", "prefix", {"use_reentrant": True}), expected, atol=1e-7)
    with pytest.raises(ValueError, match="needs non-reentrant gradient checkpointing"):
        prefix_grads("llama", "prefix_projection", {"use_reentrant": True})


def test_checkpointing_switches_are_restored_after_the_forward() -> None:
    model = wrap(petune, "gpt2", "prefix")
    model.gradient_checkpointing_enable()
    model.train()
    model(input_ids=torch.randint(3, 100, (1, 4)))
    assert model.base_model.transformer.gradient_checkpointing is True
    assert all("_can_checkpoint_with_cache" not in vars(block) for block in model.base_model.transformer.h)


def test_loading_onto_other_sizes_names_both_shapes(tmp_path: Path) -> None:
    wrap(petune, "llama", "prefix").save_pretrained(tmp_path)
    wider = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 8\).*needs \(2, 2, 4, 8\)"):
        petune.PeftModel.from_pretrained(wider, tmp_path)
    deeper = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 8\).*needs \(3, 2, 2, 8\)"):
        petune.PeftModel.from_pretrained(deeper, tmp_path)


def test_a_prompt_embeddings_tensor_of_the_wrong_shape_names_both(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    wrap(petune, "llama", "prefix").save_pretrained(tmp_path)
    save_file({"prompt_embeddings": torch.zeros(VIRTUAL, 10)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"shape \(4, 10\) in the adapter file, but \(4, 64\)"):
        petune.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_zero_init_starts_from_a_zero_prefix() -> None:
    for projection in (False, True):
        config = PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=projection, init_weights="zero")
        model = petune.get_peft_model(tiny_model("llama"), config)
        assert torch.equal(model.adapter_modules["default"]().detach(), torch.zeros(3, 2 * 2 * 16))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_unpadded_rows_attend_causally_behind_the_prefix(
    arch: str, checkpointing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows without padding skip transformers' explicit mask (`attend_behind_prefix`): same loss and gradients."""
    model = wrap(petune, arch, "prefix_projection").train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    calls: list[int] = []
    real = packed_pass.attend_behind_prefix
    monkeypatch.setattr(packed_pass, "attend_behind_prefix", lambda *args: calls.append(1) or real(*args))
    results = []
    for causal in (True, False):
        with monkeypatch.context() as patch:
            if not causal:
                patch.setattr(prefix_model, "takes_packed_attention", lambda model: False)
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
        results.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert len(calls) == 2 * (2 if checkpointing else 1)  # 2 layers, again in backward with checkpointing
    (loss, grads), (expected, expected_grads) = results
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

"""Prompt methods and HF PEFT read each other's adapter folders, and petune's folders let training resume.

For the five variants (prompt tuning; P-tuning MLP and LSTM; prefix tuning with and without projection) on
tiny Llama and Qwen2 models with grouped-query attention: a folder saved by one library and loaded by the
other gives the same logits (<= 1e-4) in both directions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import petune
from tests.methods.prompt_helpers import (
    GQA_ARCHS,
    REPARAMETERIZED,
    VARIANTS,
    left_padded,
    logits,
    sgd_step,
    tiny_model,
    wrap,
)

TOLERANCE = 1e-4


def batch() -> dict[str, torch.Tensor]:
    input_ids, _ = left_padded((6, 6))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.mark.parametrize("arch", GQA_ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_petune_folder_loads_in_peft(tmp_path: Path, arch: str, variant: str) -> None:
    ours = wrap(petune, arch, variant)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own deprecation chatter
        theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    expected = logits(ours, **batch())
    assert torch.allclose(logits(theirs, **batch()), expected, atol=TOLERANCE)
    assert expected.abs().max() > 0.1  # the logits are not trivially equal


@pytest.mark.parametrize("arch", GQA_ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_folder_loads_in_petune(tmp_path: Path, arch: str, variant: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = wrap(peft, arch, variant)
        theirs.save_pretrained(tmp_path)
        expected = logits(theirs, **batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # petune uses every tensor and config field of peft's folder
        ours = petune.PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    assert torch.allclose(logits(ours.eval(), **batch()), expected, atol=TOLERANCE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_matches_what_peft_writes(tmp_path: Path, variant: str) -> None:
    """Same fields, same values, including the key/value heads HF PEFT writes for prefix tuning under GQA."""
    wrap(petune, "llama", variant).save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrap(peft, "llama", variant).save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    bookkeeping = {"auto_mapping", "peft_version", "base_model_name_or_path"}
    assert {k: v for k, v in ours.items() if k not in bookkeeping} == {
        k: v for k, v in theirs.items() if k not in bookkeeping
    }


@pytest.mark.parametrize("variant", ["prompt", "p_tuning_mlp"])
def test_seq_cls_head_travels_both_ways(tmp_path: Path, variant: str) -> None:
    """HF PEFT keeps a prompt model's classifier under `base_model.score.weight` (one level less than LoRA)."""
    ours = wrap(petune, "llama", variant, task="SEQ_CLS")
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "score" in name and param.requires_grad:
                param.add_(torch.randn_like(param))  # a trained head, unlike the base model's
    ours.save_pretrained(tmp_path)
    assert "base_model.score.weight" in load_file(tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama", "seq_cls"), tmp_path).eval()
    assert torch.allclose(logits(theirs, **batch()), logits(ours, **batch()), atol=TOLERANCE)
    reloaded = petune.PeftModel.from_pretrained(tiny_model("llama", "seq_cls"), tmp_path)
    assert torch.allclose(logits(reloaded.eval(), **batch()), logits(ours, **batch()), atol=TOLERANCE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_resumes_where_it_stopped(tmp_path: Path, variant: str) -> None:
    """Save after two steps, load with is_trainable=True: same logits, and the next step gives the same model.

    For the reparameterised variants this needs the encoder (the MLP, the LSTM, the projection), which petune
    saves next to HF PEFT's `prompt_embeddings`; the next step would differ if only the output were restored.
    """
    data = batch()["input_ids"]
    model = wrap(petune, "llama", variant)
    for _ in range(2):
        sgd_step(model, data)
    model.save_pretrained(tmp_path)
    resumed = petune.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    assert torch.equal(logits(resumed, **batch()), logits(model, **batch()))
    sgd_step(model, data)
    sgd_step(resumed, data)
    assert torch.allclose(logits(resumed, **batch()), logits(model, **batch()), atol=1e-6)
    assert not torch.allclose(logits(resumed, **batch()), logits(wrap(petune, "llama", variant), **batch()))


@pytest.mark.parametrize("variant", REPARAMETERIZED)
def test_encoder_is_saved_next_to_prompt_embeddings(tmp_path: Path, variant: str) -> None:
    model = wrap(petune, "llama", variant)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    encoder = {k.removeprefix("prompt_encoder.") for k in tensors if k.startswith("prompt_encoder.")}
    assert encoder == set(model.adapter_modules["default"].state_dict())
    assert torch.allclose(tensors["prompt_embeddings"], model.adapter_modules["default"]().detach(), atol=1e-6)


@pytest.mark.parametrize("variant", REPARAMETERIZED)
def test_peft_folder_resumes_on_the_virtual_tokens(tmp_path: Path, variant: str) -> None:
    """A folder without the encoder (HF PEFT's) still trains: the saved virtual tokens become the parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = wrap(peft, "llama", variant)
        theirs.save_pretrained(tmp_path)
        expected = logits(theirs, **batch())
    ours = petune.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    trainable = [name for name, param in ours.named_parameters() if param.requires_grad]
    assert trainable == ["adapter_modules.default.embedding.weight"]
    assert torch.allclose(logits(ours, **batch()), expected, atol=TOLERANCE)
    before = logits(ours, **batch())
    sgd_step(ours, batch()["input_ids"])
    assert not torch.allclose(logits(ours, **batch()), before)


def test_frozen_load_has_nothing_to_train(tmp_path: Path) -> None:
    wrap(petune, "llama", "prefix_projection").save_pretrained(tmp_path)
    loaded = petune.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not any(param.requires_grad for param in loaded.parameters())


def test_two_prompt_adapters_load_side_by_side(tmp_path: Path) -> None:
    """Each adapter keeps its own encoder; switching and disabling route forward and generate correctly."""
    first, second = wrap(petune, "llama", "prefix", seed=1), wrap(petune, "llama", "prefix_projection", seed=2)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    model = petune.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "first")
    model.load_adapter(tmp_path / "second", "second")
    input_ids, mask = left_padded()
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    assert torch.allclose(logits(model, **inputs), logits(first, **inputs))
    model.set_adapter("second")
    assert torch.allclose(logits(model, **inputs), logits(second, **inputs))
    assert torch.equal(model.generate(**inputs, max_new_tokens=3), second.generate(**inputs, max_new_tokens=3))
    with model.disable_adapter():
        assert torch.allclose(logits(model, **inputs), logits(tiny_model("llama"), **inputs))

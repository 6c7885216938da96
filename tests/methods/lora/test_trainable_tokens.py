"""`LoraConfig(trainable_token_indices=...)` against the real peft: the same file keys both ways, the same
logits (untied and tied embeddings, list and dict forms), and training changes only the chosen rows."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

from petune import LoraConfig, PeftModel, get_peft_model
from tests.conftest import build_batch, build_tiny_model, model_output
from tests.methods.tuner_checks import perturb

TOLERANCE = 1e-5
TOKENS = [3, 5, 7]
CASES = [
    pytest.param(TOKENS, False, id="list-untied"),
    pytest.param(TOKENS, True, id="list-tied"),
    pytest.param({"embed_tokens": [1, 2], "lm_head": [4, 9]}, False, id="dict-untied"),
    pytest.param({"embed_tokens": [1, 2], "lm_head": [4, 9]}, True, id="dict-tied-different-ids"),
    pytest.param(TOKENS, "gpt2", id="gpt2-list-tied"),
]


def tiny(tied: bool | str) -> Any:
    """Tiny Llama with or without tied embeddings, or (`"gpt2"`) GPT-2, which ties `lm_head` to `wte`."""
    if tied == "gpt2":
        model = build_tiny_model("gpt2")
        assert model.lm_head.weight is model.transformer.wte.weight
        return model
    model = build_tiny_model("llama", tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def config_kwargs(indices: Any, tied: bool | str = False) -> dict[str, Any]:
    target = "c_attn" if tied == "gpt2" else "q_proj"
    if tied == "gpt2" and isinstance(indices, dict):
        indices = {"wte" if k == "embed_tokens" else k: v for k, v in indices.items()}
    return {"target_modules": [target], "trainable_token_indices": indices}


def keys_and_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


def changed(model: Any, tied: bool | str) -> torch.Tensor:
    output = model_output(model, build_batch())
    assert not torch.allclose(output, model_output(tiny(tied), build_batch()), atol=1e-3)
    return output


@pytest.mark.parametrize(("indices", "tied"), CASES)
def test_petune_saves_peft_loads(tmp_path: Path, indices: Any, tied: bool | str) -> None:
    ours = get_peft_model(tiny(tied), LoraConfig(**config_kwargs(indices, tied)))
    perturb(ours, seed=5)
    expected = changed(ours, tied)
    ours.save_pretrained(tmp_path / "petune")
    theirs = peft.get_peft_model(tiny(tied), peft.LoraConfig(**config_kwargs(indices, tied)))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.save_pretrained(tmp_path / "peft")
    assert keys_and_shapes(tmp_path / "petune") == keys_and_shapes(tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(tiny(tied), tmp_path / "petune")
    torch.testing.assert_close(model_output(loaded, build_batch()), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(("indices", "tied"), CASES)
def test_peft_saves_petune_loads(tmp_path: Path, indices: Any, tied: bool | str) -> None:
    theirs = peft.get_peft_model(tiny(tied), peft.LoraConfig(**config_kwargs(indices, tied)))
    perturb(theirs, seed=6)
    expected = changed(theirs, tied)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny(tied), tmp_path)
    assert not [str(w.message) for w in caught if "ignor" in str(w.message)]
    torch.testing.assert_close(model_output(loaded, build_batch()), expected, rtol=0, atol=TOLERANCE)
    if isinstance(indices, dict) and tied is True:  # two row sets in one tied weight: peft's merge changes outputs
        with pytest.raises(ValueError, match="share one"):
            loaded.merge_adapter()
        return
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(model_output(merged, build_batch()), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("tied", [False, True])
def test_a_training_step_changes_only_the_chosen_rows(tied: bool) -> None:
    base = tiny(tied)
    original = base.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(**config_kwargs(TOKENS)))
    embedding = model.get_input_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    batch = build_batch()
    batch["input_ids"][0, :3] = torch.tensor(TOKENS)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    effective = embedding.adapters["default"].rows.weight_with_rows(embedding.base_layer.weight).detach()
    changed_rows = (effective != original).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == TOKENS
    torch.testing.assert_close(embedding.base_layer.weight, original, rtol=0, atol=0)


def test_unmerge_restores_the_rows() -> None:
    model = get_peft_model(tiny(False), LoraConfig(**config_kwargs(TOKENS)))
    perturb(model, seed=7)
    weight = model.model.embed_tokens.base_layer.weight
    before = weight.detach().clone()
    model.merge_adapter()
    assert not torch.equal(weight, before)
    model.unmerge_adapter()
    torch.testing.assert_close(weight, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trainable_token_indices": [3, 1000]}, r"outside 0\.\.99"),
        ({"trainable_token_indices": {"nope": [1]}}, "matches no module"),
        ({"trainable_token_indices": [1], "modules_to_save": ["embed_tokens"]}, "both in modules_to_save"),
        ({"trainable_token_indices": {"model.layers.0.mlp": [1]}}, "must be an nn.Embedding"),
    ],
)
def test_bad_token_indices_are_clear(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny(False), LoraConfig(target_modules=["q_proj"], **kwargs))


def test_bad_token_indices_type_is_clear() -> None:
    with pytest.raises(ValueError, match="trainable_token_indices must be a list of token ids"):
        LoraConfig(trainable_token_indices=[1, "x"])  # type: ignore[list-item]


def test_mixed_batch_rows_use_their_own_adapters_rows() -> None:
    """`adapter_names=[...]`: each row gets what its adapter alone gives (different trained rows per adapter)."""
    model = get_peft_model(tiny(True), LoraConfig(**config_kwargs(TOKENS)))
    model.add_adapter("other", LoraConfig(**config_kwargs([3, 8])))
    perturb(model, seed=8)
    model.set_adapter("other")
    perturb(model, seed=9)
    batch = build_batch(rows=3)
    batch["input_ids"][:, :3] = torch.tensor([3, 5, 8])
    mixed = model_output(model, batch, adapter_names=["default", "other", "__base__"])
    for row, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[row], model_output(model, batch)[row], rtol=0, atol=TOLERANCE)
    with model.disable_adapter():
        torch.testing.assert_close(mixed[2], model_output(model, batch)[2], rtol=0, atol=TOLERANCE)

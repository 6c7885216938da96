"""`PeftModel`'s API: identity at init, what trains, several adapters, disabling, mixed batches, generation.

Every number is checked against a reference: the untouched base model, a single-adapter model, a hand
count of the parameters, or the real `peft` package. Merging is in `test_merge.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from petune import BASE_ADAPTER, LoraConfig, PeftModel, get_peft_model
from petune.layers import adapter_layers

Batch = dict[str, torch.Tensor]
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "base": "FEATURE_EXTRACTION"}
MODELS = [(a, t) for a in ("llama", "qwen2", "gpt2") for t in ("causal_lm", "seq_cls")] + [
    ("bert", "base"),
    ("bert", "seq_cls"),
]


def lora(task: str = "causal_lm", **kwargs: Any) -> LoraConfig:
    return LoraConfig(task_type=TASK_TYPES[task], r=4, lora_alpha=8, **kwargs)


def random_adapter(model: PeftModel, name: str, seed: int, task: str = "causal_lm", **kwargs: Any) -> None:
    """Add adapter `name` whose output differs from the base (both A and B random)."""
    torch.manual_seed(seed)
    model.add_adapter(name, lora(task, init_lora_weights=False, **kwargs))


@pytest.mark.parametrize(("arch", "task"), MODELS)
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"init_lora_weights": "gaussian"}])
def test_output_equals_the_base_model_at_init(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    batch: Batch,
    arch: str,
    task: str,
    variant: dict[str, Any],
) -> None:
    expected = output_of(make_model(arch, task), batch)
    wrapped = get_peft_model(make_model(arch, task), lora(task, **variant))
    torch.testing.assert_close(output_of(wrapped, batch), expected, rtol=0, atol=1e-6)


def expected_lora_count(model: nn.Module, names: list[str], r: int, dora: bool) -> int:
    """r (in + out) per adapted layer, plus `out` for DoRA's magnitude: counted from the base model."""
    total = 0
    for name, module in model.named_modules():
        if any(name.endswith(f".{n}") for n in names):
            if isinstance(module, Conv1D):
                in_features, out_features = module.nx, module.nf
            else:
                assert isinstance(module, nn.Linear)
                in_features, out_features = module.in_features, module.out_features
            total += r * (in_features + out_features) + (out_features if dora else 0)
    return total


@pytest.mark.parametrize(
    ("arch", "targets"), [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"]), ("bert", ["query", "value"])]
)
@pytest.mark.parametrize("dora", [False, True])
def test_trainable_parameters_are_the_adapter_and_follow_the_formula(
    make_model: Callable[..., nn.Module], arch: str, targets: list[str], dora: bool
) -> None:
    task = "base" if arch == "bert" else "causal_lm"
    base = make_model(arch, task)
    wrapped = get_peft_model(make_model(arch, task), lora(task, target_modules=targets, use_dora=dora))
    expected = expected_lora_count(base, targets, r=4, dora=dora)
    base_total = sum(p.numel() for p in base.parameters())
    assert wrapped.get_nb_trainable_parameters() == (expected, base_total + expected)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    if arch == "llama":  # grouped-query attention: v_proj maps 32 -> 16
        assert expected == 2 * (4 * (32 + 32) + 4 * (32 + 16)) + (2 * (32 + 16) if dora else 0)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "bert"])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_seq_cls_head_trains_and_counts_match_hf_peft(
    make_model: Callable[..., nn.Module], capsys: pytest.CaptureFixture[str], arch: str, bias: str
) -> None:
    config: dict[str, Any] = {"task_type": "SEQ_CLS", "r": 4, "use_dora": True, "bias": bias}
    wrapped = get_peft_model(make_model(arch, "seq_cls"), LoraConfig(**config))
    reference = peft.get_peft_model(make_model(arch, "seq_cls"), peft.LoraConfig(**config))
    head = "classifier" if arch == "bert" else "score"
    assert any(n.startswith(f"{head}.") or f".{head}." in n for n, p in wrapped.named_parameters() if p.requires_grad)
    assert wrapped.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    wrapped.print_trainable_parameters()
    reference.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("gpt2", "seq_cls"), ("bert", "seq_cls")])
def test_a_few_training_steps_lower_the_loss_and_leave_the_base_alone(
    make_model: Callable[..., nn.Module], batch: Batch, arch: str, task: str
) -> None:
    base_state = {k: v.clone() for k, v in make_model(arch, task).state_dict().items()}
    wrapped = get_peft_model(make_model(arch, task), lora(task, use_dora=arch == "gpt2"))
    labels = batch["input_ids"] if task == "causal_lm" else torch.tensor([0, 2])
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = wrapped(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    unloaded = wrapped.unload().state_dict()
    assert unloaded.keys() == base_state.keys()
    for key, value in base_state.items():
        if not key.startswith(("score.", "classifier.")):  # the head's trained copy replaces it on unload
            assert torch.equal(unloaded[key], value), key


def test_disable_adapter_gives_exactly_the_base_output(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch
) -> None:
    expected = output_of(make_model("llama", "seq_cls"), batch)
    wrapped = get_peft_model(make_model("llama", "seq_cls"), lora("seq_cls", init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        wrapped.base_model.score.adapters["default"].weight.add_(1.0)  # the trained head copy differs too
    adapted = output_of(wrapped, batch)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    with wrapped.disable_adapter():
        assert torch.equal(output_of(wrapped, batch), expected)
    assert torch.equal(output_of(wrapped, batch), adapted)


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_set_adapter_switches_between_adapters(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch, task: str
) -> None:
    only_a, only_b = make_model("qwen2", task), make_model("qwen2", task)
    torch.manual_seed(1)  # after building: the builder seeds the generator itself
    only_a = get_peft_model(only_a, lora(task, init_lora_weights=False), "a")
    only_b = get_peft_model(only_b, lora(task, init_lora_weights=False, use_dora=True), "b")
    both = get_peft_model(make_model("qwen2", task), lora(task), "a")
    both.add_adapter("b", lora(task, use_dora=True))
    both.load_state_dict({**only_a.state_dict(), **only_b.state_dict()}, strict=False)
    assert both.active_adapter == "a"
    torch.testing.assert_close(output_of(both, batch), output_of(only_a, batch), rtol=0, atol=1e-6)
    both.set_adapter("b")
    torch.testing.assert_close(output_of(both, batch), output_of(only_b, batch), rtol=0, atol=1e-6)
    assert not torch.allclose(output_of(only_a, batch), output_of(only_b, batch), atol=1e-3)


def two_adapter_model(make_model: Callable[..., nn.Module], arch: str, task: str) -> PeftModel:
    wrapped = make_model(arch, task)
    torch.manual_seed(1)
    wrapped = get_peft_model(wrapped, lora(task, init_lora_weights=False), "a")
    random_adapter(wrapped, "b", seed=2, task=task, use_dora=True)
    if task == "seq_cls":  # make the two head copies differ from each other and from the base head
        head = "classifier" if arch == "bert" else "score"
        with torch.no_grad():
            wrapped.base_model.get_submodule(head).adapters["a"].weight.add_(0.5)
            wrapped.base_model.get_submodule(head).adapters["b"].weight.sub_(0.5)
    return wrapped


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("gpt2", "seq_cls"), ("bert", "seq_cls")])
def test_mixed_batch_gives_each_row_its_adapter(
    make_model: Callable[..., nn.Module],
    output_of: Callable[..., torch.Tensor],
    make_batch: Callable[..., Batch],
    arch: str,
    task: str,
) -> None:
    batch = make_batch(rows=4)
    wrapped = two_adapter_model(make_model, arch, task)
    names = ["b", BASE_ADAPTER, "a", "b"]
    mixed = output_of(wrapped, batch, adapter_names=names)
    per_adapter = {BASE_ADAPTER: output_of(make_model(arch, task), batch)}
    for name in ("a", "b"):
        wrapped.set_adapter(name)
        per_adapter[name] = output_of(wrapped, batch)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], rtol=0, atol=1e-5)
    assert not torch.allclose(per_adapter["a"], per_adapter["b"], atol=1e-3)


def test_mixed_batch_input_errors(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch
) -> None:
    wrapped = two_adapter_model(make_model, "llama", "causal_lm")
    with pytest.raises(ValueError, match="unknown adapters"):
        output_of(wrapped, batch, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        output_of(wrapped, batch, adapter_names=["a", "b", "a"])
    wrapped.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        output_of(wrapped, batch, adapter_names=["a", "b"])


def test_generate_matches_hf_peft_and_mixes_adapters(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    prompts = {"input_ids": torch.tensor([[5, 17, 42, 8], [9, 33, 61, 12]]), "attention_mask": torch.ones(2, 4)}
    settings: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    wrapped = two_adapter_model(make_model, "llama", "causal_lm")
    wrapped.save_pretrained(tmp_path)
    generated = {}
    for name in ("a", "b"):
        wrapped.set_adapter(name)
        generated[name] = wrapped.generate(**prompts, **settings)
        assert torch.equal(wrapped.generate(**prompts, **settings, use_cache=False), generated[name])
        reference = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / name)
        assert torch.equal(reference.generate(**prompts, **settings), generated[name])
    mixed = wrapped.generate(**prompts, **settings, adapter_names=["b", "a"])
    assert torch.equal(mixed[0], generated["b"][0]) and torch.equal(mixed[1], generated["a"][1])
    # Beam search repeats each prompt in place: rows 0-1 come from prompt 0, rows 2-3 from prompt 1.
    beams = {"num_beams": 2, "num_return_sequences": 2}
    mixed = wrapped.generate(**prompts, **settings, **beams, adapter_names=["b", "a"])
    for name, rows in (("b", slice(0, 2)), ("a", slice(2, 4))):
        wrapped.set_adapter(name)
        assert torch.equal(mixed[rows], wrapped.generate(**prompts, **settings, **beams)[rows])
    with wrapped.disable_adapter():
        assert torch.equal(wrapped.generate(**prompts, **settings), make_model("llama").generate(**prompts, **settings))


def test_adapter_registry_rules(make_model: Callable[..., nn.Module]) -> None:
    wrapped = get_peft_model(make_model("llama"), lora())
    with pytest.raises(ValueError, match="exists already"):
        wrapped.add_adapter("default", lora())
    with pytest.raises(ValueError, match="reserved"):
        wrapped.add_adapter(BASE_ADAPTER, lora())
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        wrapped.set_adapter("nope")
    with pytest.raises(ValueError, match="already a PeftModel"):
        get_peft_model(wrapped, lora())  # type: ignore[arg-type]


def test_only_one_adapter_may_train_biases(make_model: Callable[..., nn.Module]) -> None:
    wrapped = get_peft_model(make_model("qwen2"), lora(bias="all"))
    wrapped.add_adapter("plain", lora())
    with pytest.raises(ValueError, match="'default' already trains biases"):
        wrapped.add_adapter("second", lora(bias="lora_only"))
    wrapped.delete_adapter("default")
    wrapped.add_adapter("second", lora(bias="lora_only"))


def trainable_adapters(model: PeftModel) -> set[str]:
    names = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    return names


def test_only_the_active_adapter_trains(make_model: Callable[..., nn.Module]) -> None:
    # HF PEFT's rules: a new adapter is neither active nor trainable; set_adapter moves training with it;
    # deleting the active adapter activates the first remaining one in sorted order.
    wrapped = get_peft_model(make_model("llama", "seq_cls"), lora("seq_cls"), "m")
    wrapped.add_adapter("z", lora("seq_cls"))
    assert wrapped.active_adapter == "m" and trainable_adapters(wrapped) == {"m"}
    wrapped.set_adapter("z")
    assert trainable_adapters(wrapped) == {"z"}
    wrapped.add_adapter("c", lora("seq_cls"))
    with pytest.warns(UserWarning, match="'c' is now active"):
        wrapped.delete_adapter("z")
    assert wrapped.active_adapter == "c" and trainable_adapters(wrapped) == {"c"}
    assert list(wrapped.peft_config) == ["m", "c"]
    assert not any(".adapters.z." in n for n, _ in wrapped.named_parameters())


def test_deleting_every_adapter_restores_the_original_modules(
    make_model: Callable[..., nn.Module], output_of: Callable[..., torch.Tensor], batch: Batch
) -> None:
    expected = output_of(make_model("gpt2", "seq_cls"), batch)
    wrapped = two_adapter_model(make_model, "gpt2", "seq_cls")
    wrapped.delete_adapter("b")
    wrapped.delete_adapter("a")
    assert not list(adapter_layers(wrapped.base_model)) and wrapped.active_adapter is None
    assert torch.equal(output_of(wrapped, batch), expected)
    assert type(wrapped.base_model.transformer.h[0].attn.c_attn) is Conv1D


def test_inference_adapters_stay_frozen(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    get_peft_model(make_model("llama"), lora()).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    frozen.load_adapter(tmp_path, "more")
    frozen.set_adapter("more")
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    assert trainable_adapters(trainable) == {"default"}


def test_plain_module(make_mlp: Callable[..., nn.Module], tmp_path: Path) -> None:
    inputs = torch.randn(4, 6)
    expected = make_mlp()(inputs).detach()
    wrapped = get_peft_model(make_mlp(), LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["fc2"]))
    torch.testing.assert_close(wrapped(inputs), expected, rtol=0, atol=0)
    assert wrapped.get_nb_trainable_parameters()[0] == 2 * (6 + 16) + (16 * 3 + 3)
    with torch.no_grad():
        wrapped.base_model.fc1.adapters["default"].lora_B.weight.normal_()
        adapted = wrapped(inputs)
        mixed = wrapped(inputs, adapter_names=["default", BASE_ADAPTER, BASE_ADAPTER, "default"])
    assert not torch.allclose(adapted, expected, atol=1e-3)
    torch.testing.assert_close(mixed[[0, 3]], adapted[[0, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[[1, 2]], expected[[1, 2]], rtol=0, atol=1e-6)
    wrapped.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), adapted, rtol=0, atol=1e-6)
    merged = loaded.merge_and_unload()
    assert type(merged) is type(make_mlp()) and type(merged.fc1) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs), adapted, rtol=0, atol=1e-5)

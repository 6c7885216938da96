"""Which modules an adapter touches: petune must pick exactly the modules HF PEFT picks for the same config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peft
import pytest
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from petune import LoraConfig, get_peft_model, targets
from petune.layers import ModulesToSave, adapter_layers
from petune.methods.lora import LoraLayer

PEFT_PREFIX = "base_model.model."


def petune_choice(model: nn.Module, **config: Any) -> tuple[list[str], list[str]]:
    """(LoRA-adapted module names, `modules_to_save` module names) that petune picks."""
    wrapped = get_peft_model(model, LoraConfig(**config))
    layers = list(adapter_layers(wrapped.base_model))
    lora = sorted(n for n, m in layers if isinstance(m, LoraLayer))
    saved = sorted(n for n, m in layers if isinstance(m, ModulesToSave))
    return lora, saved


def peft_choice(model: nn.Module, **config: Any) -> tuple[list[str], list[str]]:
    """The same for the real `peft` package."""
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    modules = [(n.removeprefix(PEFT_PREFIX), m) for n, m in wrapped.named_modules()]
    lora = sorted(n for n, m in modules if isinstance(m, BaseTunerLayer) and not isinstance(m, ModulesToSaveWrapper))
    saved = sorted(n for n, m in modules if isinstance(m, ModulesToSaveWrapper))
    return lora, saved


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("llama", "causal_lm", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", "causal_lm", {"target_modules": r".*\.(q|k)_proj"}),
    ("llama", "causal_lm", {"target_modules": ["self_attn.o_proj", "mlp.up_proj"]}),
    ("llama", "causal_lm", {"target_modules": "all-linear"}),
    ("llama", "causal_lm", {"target_modules": "all-linear", "exclude_modules": ["down_proj", "k_proj"]}),
    ("llama", "causal_lm", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
    ("llama", "causal_lm", {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    ("llama", "causal_lm", {}),  # the architecture's default targets
    ("llama", "seq_cls", {"task_type": "SEQ_CLS", "target_modules": "all-linear"}),
    ("llama", "causal_lm", {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["v_proj"]}),
    ("llama", "causal_lm", {"target_modules": ["q_proj"], "modules_to_save": ["norm"]}),  # HF PEFT: any suffix
    ("qwen2", "causal_lm", {}),
    ("qwen2", "seq_cls", {"task_type": "SEQ_CLS", "target_modules": ["q_proj", "v_proj"]}),
    ("gpt2", "causal_lm", {}),
    ("gpt2", "causal_lm", {"target_modules": "all-linear"}),  # lm_head (tied, the output) is left alone
    ("gpt2", "seq_cls", {"task_type": "SEQ_CLS", "target_modules": ["c_attn"], "layers_to_transform": [1]}),
    ("bert", "base", {}),
    ("bert", "seq_cls", {"task_type": "SEQ_CLS", "target_modules": "all-linear"}),
    ("bert", "base", {"target_modules": ["query", "dense"], "modules_to_save": ["pooler"]}),
    ("bert", "base", {"target_modules": ["query"], "exclude_modules": r".*layer\.0\..*"}),
]


@pytest.mark.parametrize(("arch", "task", "config"), CASES, ids=lambda c: str(c) if isinstance(c, dict) else c)
def test_picks_the_modules_hf_peft_picks(
    make_model: Callable[..., nn.Module], arch: str, task: str, config: dict[str, Any]
) -> None:
    ours = petune_choice(make_model(arch, task), **config)
    theirs = peft_choice(make_model(arch, task), **config)
    assert ours == theirs
    assert ours[0], "the case should adapt something"


def test_all_linear_on_a_plain_module_takes_every_linear_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert petune_choice(model, target_modules="all-linear") == (["0", "2"], [])


def test_all_linear_saves_the_names_it_picked(make_model: Callable[..., nn.Module]) -> None:
    wrapped = get_peft_model(make_model("gpt2"), LoraConfig(target_modules="all-linear"))
    reference = peft.get_peft_model(make_model("gpt2"), peft.LoraConfig(target_modules="all-linear"))
    assert wrapped.peft_config["default"].target_modules == sorted(reference.peft_config["default"].target_modules)


def test_list_matches_exactly_or_as_a_dotted_suffix() -> None:
    assert targets.matches(["q_proj"], "q_proj")
    assert targets.matches(["q_proj"], "model.layers.0.self_attn.q_proj")
    assert targets.matches(["self_attn.q_proj"], "model.layers.0.self_attn.q_proj")
    assert not targets.matches(["proj"], "model.layers.0.self_attn.q_proj")
    assert not targets.matches(["attn.q_proj"], "model.layers.0.self_attn.q_proj")


def test_string_is_a_full_match_regex() -> None:
    assert targets.matches(r".*q_proj", "model.layers.0.self_attn.q_proj")
    assert not targets.matches(r"q_proj", "model.layers.0.self_attn.q_proj")
    assert not targets.matches(r".*q", "model.layers.0.self_attn.q_proj")


def test_layer_index() -> None:
    assert targets.layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert targets.layer_index("transformer.h.1.attn.c_attn", "h") == 1
    assert targets.layer_index("bert.encoder.layer.0.attention.self.query", ["layers", "layer"]) == 0
    assert targets.layer_index("lm_head", None) is None


def test_target_modules_matching_nothing_lists_the_linear_layers(make_model: Callable[..., nn.Module]) -> None:
    with pytest.raises(ValueError, match=r"q_projj.*matched no layer") as error:
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_projj"]))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in str(error.value)


def test_missing_default_for_unknown_architecture_lists_the_linear_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="target_modules is not set"):
        get_peft_model(model, LoraConfig())


def test_non_linear_target_is_refused(make_model: Callable[..., nn.Module]) -> None:
    with pytest.raises(ValueError, match=r"embed_tokens.*Embedding"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["embed_tokens"]))


def test_unknown_modules_to_save_is_refused(make_model: Callable[..., nn.Module]) -> None:
    with pytest.raises(ValueError, match="no_such_module"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], modules_to_save=["no_such_module"]))


def test_modules_to_save_never_reaches_inside_an_adapter_layer(make_model: Callable[..., nn.Module]) -> None:
    # "lora_A" is the name of a submodule of every LoRA layer: it must not be taken for a module to save.
    with pytest.raises(ValueError, match="lora_A"):
        get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"], modules_to_save=["lora_A"]))


def test_layers_to_transform_with_rank_pattern_and_defaults(make_model: Callable[..., nn.Module]) -> None:
    wrapped = get_peft_model(make_model("llama"), LoraConfig(r=4, layers_to_transform=[0], rank_pattern={"v_proj": 2}))
    ranks = {n: m.adapters["default"].r for n, m in adapter_layers(wrapped.base_model) if isinstance(m, LoraLayer)}
    assert ranks == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 2}

"""`PeftConfig` / `LoraConfig`: validation, defaults and the JSON round-trip in HF PEFT's field names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest

from petune import LoraConfig, PeftConfig, PeftType, TaskType


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -4}, "r"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"task_type": "TRANSLATION"}, "task_type"),
        ({"bias": "some"}, "bias"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kwargs)  # type: ignore[arg-type]


def test_layers_to_transform_needs_a_list_of_targets() -> None:
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_task_type_string_becomes_the_enum() -> None:
    config = LoraConfig(task_type="CAUSAL_LM")
    assert config.task_type is TaskType.CAUSAL_LM
    assert config.peft_type is PeftType.LORA


def test_seq_cls_trains_and_saves_the_classification_head() -> None:
    config = LoraConfig(task_type=TaskType.SEQ_CLS, modules_to_save=["extra"])
    assert config.modules_to_save == ["extra", "classifier", "score"]


def test_defaults_match_hf_peft() -> None:
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "init_lora_weights"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.use_rslora, ours.use_dora) == (theirs.use_rslora, theirs.use_dora)


def test_json_round_trip(tmp_path: Path) -> None:
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=16,
        target_modules=["v_proj", "q_proj"],
        use_dora=True,
        rank_pattern={"q_proj": 2},
        layers_to_transform=1,
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert data["layers_to_transform"] == [1]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraConfig)
    assert loaded == config


def test_reads_hf_peft_config_without_warnings(tmp_path: Path) -> None:
    # HF PEFT writes many fields petune has no use for; their default values must not warn.
    peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], use_rslora=True).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LoraConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraConfig)
    assert (loaded.r, loaded.use_rslora, loaded.target_modules) == (4, True, ["q_proj"])


def test_unknown_fields_from_newer_versions_warn_and_are_ignored(tmp_path: Path) -> None:
    data = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    data["some_future_option"] = 3
    data["another_new_flag"] = None  # unset: nothing to warn about
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_option") as record:
        loaded = PeftConfig.from_pretrained(tmp_path)
    assert "another_new_flag" not in str(record[0].message)
    assert isinstance(loaded, LoraConfig) and loaded.r == 4


def test_missing_config_names_the_path_and_subfolders(tmp_path: Path) -> None:
    LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json.*subfolders: other"):
        PeftConfig.from_pretrained(tmp_path)


def test_unknown_peft_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "C3A"}))
    with pytest.raises(ValueError, match="C3A"):
        PeftConfig.from_pretrained(tmp_path)

"""TrainConfig: defaults, YAML, dotted flag overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from petune import LoraConfig
from petune.train import UserError
from petune.train.config import METHOD_NAMES, TrainConfig, build_config, option_table, read_yaml
from petune.train.methods import METHODS, learning_rate, peft_config


def test_defaults_are_the_demo_run() -> None:
    cfg = build_config()
    assert cfg == TrainConfig()
    assert cfg.model is None and cfg.data is None and cfg.method == "lora"


def test_yaml_then_flags_later_layers_win(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("method: dora\nmax_steps: 7\nlora:\n  r: 4\n  lora_alpha: 8\n  target_modules: [q_proj, v_proj]\n")
    cfg = build_config(read_yaml(path), {"lora.r": "16", "max-steps": "9", "packing": "true"})
    assert (cfg.method, cfg.max_steps, cfg.packing) == ("dora", 9, True)
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (16, 8.0, ["q_proj", "v_proj"])
    lora = peft_config(cfg, "unused")
    assert isinstance(lora, LoraConfig) and lora.use_dora and not lora.use_rslora and lora.r == 16


def test_comma_lists_and_none() -> None:
    cfg = build_config({"lora.target_modules": "q_proj, k_proj", "lr": "none"})
    assert cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.lr is None
    assert learning_rate(cfg) == 2e-3
    assert learning_rate(build_config({"method": "prompt"})) == 3e-2
    assert learning_rate(build_config({"method": "ptuning"})) == 1e-2  # BENCHMARKS.md: 35% vs 1.7% at 3e-2
    prefix = build_config({"method": "prefix"})  # BENCHMARKS.md: 88.3% vs 6.7% for the bare table at 3e-2
    assert prefix.prefix.prefix_projection and learning_rate(prefix) == 2e-3
    assert learning_rate(build_config({"method": "prefix", "prefix.prefix_projection": False})) == 3e-2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lora.rr": 3}, r"unknown option\(s\): lora.rr"),
        ({"max_steps": "many"}, "option max_steps expects int, got 'many'"),
        ({"max_steps": 2.5}, "option max_steps expects int"),
        ({"packing": "maybe"}, "option packing expects bool"),
        ({"method": "adapterfusion"}, "--method 'adapterfusion' is unknown; choose one of: full, lora, dora"),
        ({"max_steps": 0}, "--max-steps must be at least 1"),
        ({"val_fraction": 1.5}, r"--val-fraction must be in \[0, 1\)"),
        ({"resume": True}, "--resume needs --output"),
    ],
)
def test_bad_options(values: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config(values)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        read_yaml(tmp_path / "broken.yaml")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = build_config({"method": "rslora", "lora.r": 2, "output": "x"})
    cfg.save(tmp_path / "config.yaml")
    assert build_config(read_yaml(tmp_path / "config.yaml")) == cfg


def test_every_option_has_help() -> None:
    for name, _, _, text in option_table():
        assert text, name


def test_every_method_name_has_a_method_and_back() -> None:
    assert list(METHODS) == list(METHOD_NAMES)  # the --method choices and the table that builds them

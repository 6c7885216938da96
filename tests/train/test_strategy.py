"""`--strategy`, `--offload` and `--deepspeed CONFIG.json`: the DeepSpeed config a run uses, and each mistake
refused in one line (exit 2) before any process starts or any file is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from petune.cli import main
from petune.train.config import build_config
from petune.train.strategy import SHARDED_METHODS, check, deepspeed_config, has_deepspeed

ZERO2 = {"zero_optimization": {"stage": 2}}


def refused(args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> str:
    """The one-line error of `petune train ARGS`; nothing written to the run folder."""
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("petune train: error: "), err
    assert not run.exists()
    return err


def write(tmp_path: Path, config: object) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "zero9"], "--strategy 'zero9' is unknown; choose one of: ddp, fsdp, zero2, zero3"),
        (["--offload", "disk", "--strategy", "zero3"], "--offload 'disk' is unknown"),
        (["--offload", "optimizer"], "--offload needs a sharding strategy: add --strategy zero2, zero3 or fsdp"),
        (["--strategy", "zero2", "--offload", "params"], "ZeRO-2 does not partition parameters"),
        (["--strategy", "fsdp", "--offload", "optimizer"], "FSDP offloads parameters, gradients and optimizer"),
        (["--strategy", "zero3", "--objective", "dpo"], "--objective dpo runs under --strategy ddp only"),
        (["--strategy", "zero2", "--method", "adalora"], "--method adalora runs under --strategy ddp only"),
    ],
)
def test_impossible_combinations_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert message in refused(args, capsys, tmp_path)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
@pytest.mark.parametrize("method", SHARDED_METHODS)
def test_every_sharded_method_runs_under_every_strategy(method: str, strategy: str) -> None:
    """No method of SHARDED_METHODS is refused under any engine (tests/train/test_engines.py trains them)."""
    check(build_config({"method": method, "strategy": strategy}))


@pytest.mark.parametrize(
    ("config", "flags", "message"),
    [
        (
            {**ZERO2, "train_micro_batch_size_per_gpu": 4},
            [],
            "train_micro_batch_size_per_gpu is 4 but --batch-size is 8",
        ),
        (
            {**ZERO2, "gradient_accumulation_steps": 2},
            ["--grad-accum", "4"],
            "gradient_accumulation_steps is 2 but --grad-accum",
        ),
        ({**ZERO2, "gradient_clipping": 0.5}, [], "gradient_clipping is 0.5 but --max-grad-norm is 1.0"),
        (
            {"zero_optimization": {"stage": 3}},
            ["--strategy", "zero2"],
            "zero_optimization.stage is 3, which contradicts",
        ),
        ({"zero_optimization": {"stage": 1}}, [], "zero_optimization.stage is 1; petune runs ZeRO stage 2 or 3"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
            ["--offload", "optimizer"],
            "zero_optimization.offload_param contradicts --offload optimizer",
        ),
        ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, [], "bf16.enabled casts the trained tensors"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}, [], "remove the 'optimizer' section"),
        ([1, 2], [], "must hold a JSON object"),
    ],
)
def test_a_deepspeed_config_that_contradicts_the_flags_is_refused(
    config: object, flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = refused(["--deepspeed", write(tmp_path, config), *flags], capsys, tmp_path)
    assert message in err and "ds.json" in err


def test_a_malformed_deepspeed_config_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3,}}')
    assert "is not valid JSON" in refused(["--deepspeed", str(path)], capsys, tmp_path)
    assert "none.json does not exist" in refused(["--deepspeed", str(tmp_path / "none.json")], capsys, tmp_path)


def test_without_deepspeed_the_fix_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    assert "needs DeepSpeed: pip install 'petune[deepspeed]'" in refused(["--strategy", "zero3"], capsys, tmp_path)
    assert main(["train", "--strategy", "fsdp", "--max-steps", "0"]) == 2  # FSDP2 is torch's: no DeepSpeed needed
    assert "DeepSpeed" not in capsys.readouterr().err


def test_the_deepspeed_config_is_the_users_with_the_flags_filled_in(tmp_path: Path) -> None:
    user = {
        "zero_optimization": {"stage": 3, "overlap_comm": True, "offload_param": {"device": "cpu"}},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
    }
    cfg = build_config({"deepspeed": write(tmp_path, user), "batch_size": 2, "grad_accum": 3})
    assert (cfg.strategy, cfg.offload) == ("zero3", "params")  # taken from the file
    config = deepspeed_config(cfg, world=4)
    assert config["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "offload_param": {"device": "cpu"},
        "offload_optimizer": {"device": "cpu"},
    }
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 3)
    assert (config["train_batch_size"], config["gradient_clipping"]) == (24, 1.0)
    assert config["zero_allow_untested_optimizer"] and config["bf16"] == {"enabled": False}


def test_flags_alone_make_the_config() -> None:
    config = deepspeed_config(build_config({"strategy": "zero2", "offload": "optimizer"}), world=2)
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert config["train_batch_size"] == 16


def test_ddp_leaves_the_frozen_parameters_out_of_its_broadcast(tiny_model_dir: Path) -> None:
    """DDP would broadcast (and copy) every parameter when it wraps the model: the frozen ones are ignored."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from petune import LoraConfig, get_peft_model
    from petune.train.engines import Engine

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    accelerator = SimpleNamespace(num_processes=2, prepare=lambda module: module)
    Engine("ddp", accelerator, model, None, 1)  # type: ignore[arg-type]
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    names = dict(model.named_parameters())
    assert ignored == {name for name, p in names.items() if not p.requires_grad} and ignored < names.keys()


def test_zero3_gathers_about_one_decoder_layer(tiny_model_dir: Path) -> None:
    """ZeRO-3's prefetch, live and reuse limits come from one decoder layer's parameters, not DeepSpeed's 1e9."""
    from transformers import AutoModelForCausalLM

    from petune.train.strategy import zero3_gathering

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert zero3_gathering(model) == {
        "stage3_prefetch_bucket_size": layer,
        "stage3_max_live_parameters": 2 * layer,
        "stage3_max_reuse_distance": layer,
    }
    assert zero3_gathering(torch.nn.Linear(2, 2)) == {}


FSDP_PREPARE = """
import sys
import torch
from transformers import AutoModelForCausalLM
from petune import LoraConfig, get_peft_model
from petune.train.config import build_config
from petune.train.engines import make_engine
from petune.train.strategy import make_accelerator
accelerator = make_accelerator(build_config({"strategy": "fsdp"}), None)
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
engine = make_engine("fsdp", accelerator, model, optimizer, 1)
print(type(engine.trained).__name__, "deepspeed" in sys.modules)
"""


@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed: nothing would import it")
def test_fsdp_does_not_import_deepspeed(tiny_model_dir: Path) -> None:
    """accelerate's FSDP2 prepare imports DeepSpeed when it is installed (+146 MiB a process on CPU): not in petune."""
    import os
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run(
        [sys.executable, "-c", FSDP_PREPARE, str(tiny_model_dir)],
        env={**os.environ, **group},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["FSDPPeftModel", "False"], done.stdout

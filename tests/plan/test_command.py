"""`petune plan` on the command line: the table, `--json`, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from petune.cli import main
from petune.plan import ARCHITECTURES, COMPONENTS
from petune.plan.command import DEFAULT_METHODS


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_total_fit_and_components(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "llama-2-7b", "--method", "lora", "--gpu", "rtx4090", "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["components"]) == set(COMPONENTS)
    assert result["total_gb"] == pytest.approx(sum(result["components"].values()), abs=0.01)
    assert result["fits"] is True and result["trainable_params"] == 4_194_304  # 32 x (4096+4096) x 8 x 2
    assert result["max_batch_size"] >= 1 and result["max_seq_len"] >= 512
    assert result["flops_per_token"] > 4 * 6.7e9


def test_json_for_several_methods_lists_plans(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "smollm2", "--method", "full,qlora", "--gpu-memory", "8", "--json")
    assert code == 0
    plans = json.loads(out)["plans"]
    assert [p["method"] for p in plans] == ["full", "qlora"] and all(p["device_gb"] == 8 for p in plans)


def test_prefix_tuning_is_planned_as_petune_train_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    """The projection MLP is on by default in `petune train` (512 wide): plan counts it unless told otherwise."""
    counts = {}
    for flag in ("true", "false"):
        code, out, _ = run(capsys, "--model", "smollm2", "--method", "prefix", "--prefix-projection", flag, "--json")
        assert code == 0
        counts[flag] = json.loads(out)["trainable_params"]
    assert counts["false"] == 20 * 30 * 2 * 192  # virtual tokens x layers x (key, value) x kv width
    # the (20, 192) table and its MLP 192 -> 512 -> 30 x 2 x 192, with biases: what `petune train --method prefix`
    # prints for the embedded SmolLM2 (6,012,416 trainable parameters)
    assert counts["true"] == 20 * 192 + (192 * 512 + 512) + (512 * 11520 + 11520) == 6_012_416
    code, out, _ = run(capsys, "--model", "smollm2", "--method", "prefix", "--json")
    assert json.loads(out)["trainable_params"] == counts["true"]


def test_table_shows_every_method_and_component(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "mistral-7b", "--gradient-checkpointing", "--gpu", "a100-80gb")
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("GB at the peak"))
    assert header.split()[4:] == list(DEFAULT_METHODS)
    for label in ("frozen weights", "optimizer state", "activations", "logits/loss", "framework overhead", "fits"):
        assert label in out
    assert "gradient checkpointing" in out


def test_config_json_and_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    code, out, _ = run(capsys, "--model", str(tmp_path), "--gpu", "cpu", "--method", "lora", "--json")
    assert code == 0
    result = json.loads(out)
    assert (
        result["dtype"] == "fp32"
        and result["device"] == "cpu"
        and result["total_params"] == 2 * 1000 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    )


def test_model_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--model", "list")
    assert code == 0 and all(name in out for name in ARCHITECTURES)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "gpt-5"], "llama-2-7b"),  # the known names are listed
        (["--gpu", "rtx9090"], "a100-80gb"),
        (["--method", "lora,adapterdrop"], "--method 'adapterdrop' is unknown"),
        (["--lora-targets", "qkv"], "q_proj"),
        (["--seq-len", "0"], "--seq-len must be at least 1"),
    ],
)
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1


def test_config_without_the_needed_fields_names_them(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128}))
    code, _, err = run(capsys, "--model", str(tmp_path), "--gpu", "cpu")
    assert code == 2
    assert "lacks the field(s) plan needs: num_hidden_layers, num_attention_heads, vocab_size" in err
    assert len(err.strip().splitlines()) == 1

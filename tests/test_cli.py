"""The `petune` command on a tiny Llama: every method through `train`, the other commands, bad input."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from petune import PeftModel
from petune.cli import main
from petune.train.config import option_table
from tests.train.tiny import chat_rows, tiny_args, tiny_data, tiny_model_dir, tokenizer, write_jsonl

__all__ = ["tiny_data", "tiny_model_dir", "tokenizer"]  # fixtures

COMMANDS = ["train", "generate", "chat", "eval", "merge"]
PROMPT_CONFIGS = {"prompt": "PromptTuningConfig", "ptuning": "PromptEncoderConfig", "prefix": "PrefixTuningConfig"}


def has_config(name: str) -> bool:
    return hasattr(importlib.import_module("petune"), name)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_documents_every_option_with_its_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: petune" in text
    flags = [line.split()[0] for line in text.splitlines() if line.strip().startswith("--") and "help" not in line]
    assert flags
    if command == "train":
        for name, *_ in option_table():
            assert f"--{name.replace('_', '-')}" in text
        assert " ".join(text.split()).count("default:") >= len(option_table())


def test_console_script_runs_without_arguments_to_help() -> None:
    result = subprocess.run([sys.executable, "-m", "petune.cli"], capture_output=True, text=True)
    assert result.returncode == 2 and "train" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "prompt", "ptuning", "prefix"])
def test_every_method_trains_through_the_cli(
    method: str, tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    if method in PROMPT_CONFIGS and not has_config(PROMPT_CONFIGS[method]):
        pytest.skip(f"petune.{PROMPT_CONFIGS[method]} is not available yet")
    run = tmp_path / "run"
    assert main(tiny_args(tiny_model_dir, tiny_data, run, "--method", method)) == 0
    for name in ["config.yaml", "metrics.jsonl", "loss.png", "eval.json", "adapter/adapter_config.json"]:
        assert (run / name).is_file(), name
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    expected_type = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}.get(method, "LORA")
    assert config["peft_type"] == expected_type
    assert config.get("use_dora", False) == (method == "dora") and config.get("use_rslora", False) == (
        method == "rslora"
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    results = json.loads((run / "eval.json").read_text())
    assert {"before", "after", "heldout", "samples"} <= set(results)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    initial_zero = [k for k in weights if "lora_B" in k]
    assert all(weights[k].abs().sum() > 0 for k in initial_zero), "LoRA B should have moved from zero"


def test_qlora_trains_or_says_why_not(
    tokenizer: PreTrainedTokenizerBase, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # bitsandbytes quantises in blocks of 64 inputs: this model's layers are 64 wide
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code = main(tiny_args(tmp_path / "model", tiny_data, tmp_path / "run", "--method", "qlora"))
    if code != 0:
        error = capsys.readouterr().err
        assert code == 2 and "qlora" in error and "Traceback" not in error
        pytest.skip(f"qlora is not available here: {error.strip()}")
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert weights and all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # gradients reached B


def test_packing_prompt_loss_bf16_accumulation_and_linear_schedule(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path
) -> None:
    options = ["--packing", "--train-on-prompt", "true", "--precision", "bf16", "--grad-accum", "2"]
    options += ["--schedule", "linear", "--warmup-steps", "0", "--max-grad-norm", "0", "--weight-decay", "0.1"]
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "run"), *options]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [1e-2, 7.5e-3, 5e-3, 2.5e-3]
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)


def test_yaml_config_with_flag_overrides(tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("method: rslora\nmax_steps: 3\nlora:\n  r: 4\n  target_modules: q_proj\n")
    args = tiny_args(tiny_model_dir, tiny_data, tmp_path / "run")
    at = args.index("--max-steps")
    args = [*args[:at], *args[at + 2 :], "--config", str(config), "--lora.r", "2"]
    assert main(args) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "method: rslora" in saved and "max_steps: 3" in saved
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["use_rslora"] and adapter["target_modules"] == ["q_proj"]


def test_an_existing_run_folder_is_kept_without_overwrite(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    assert main(tiny_args(tiny_model_dir, tiny_data, run)) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "mine"
    assert main(tiny_args(tiny_model_dir, tiny_data, run, "--overwrite", "--max-steps", "1")) == 0
    assert not (run / "keep.txt").exists() and (run / "adapter").is_dir()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--method", "adapterfusion"], "--method 'adapterfusion' is unknown"),
        (["--data", "/nonexistent/data.jsonl"], "data file /nonexistent/data.jsonl does not exist"),
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--max-length", "8"], "the prompt is"),
        (["--max-steps", "lots"], "option max_steps expects int"),
        (["--lora.r", "0"], "LoraConfig.r must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    change: list[str],
    message: str,
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "run"), *change]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and error.startswith("petune train: error:")


def test_bad_data_files_through_the_cli(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(chat_rows(1)[0]) + "\n{oops\n")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "hi"}])
    for path, message in [
        (broken, f"{broken}:2: not valid JSON"),
        (empty, "holds no records"),
        (wrong, f"{wrong}:1: record has fields ['text']"),
    ]:
        assert main([*tiny_args(tiny_model_dir, tiny_data, tmp_path / "run"), "--data", str(path)]) == 2
        assert message in capsys.readouterr().err


def test_unknown_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--lora.rank", "4"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --lora.rank" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(tiny_args(tiny_model_dir, tiny_data, run, "--lr", "5e-2", "--lora.target-modules", "all-linear")) == 0
    return run


def test_generate_one_prompt_and_a_file(
    trained_run: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["generate", "--adapter", str(trained_run), "--max-new-tokens", "3", "Convert March 3, 1999 to ISO."]) == 0
    )
    assert capsys.readouterr().out.strip()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, chat_rows(1)[0]])
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(trained_run / "adapter"),
                "--file",
                str(prompts),
                "--max-new-tokens",
                "2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all("generation" in r for r in rows) and rows[0]["prompt"] == "Hello"


def test_eval_reports_loss_and_accuracy(
    trained_run: Path, tiny_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(trained_run), "--data", str(tiny_data[1]), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["records"] == 6 and result["count"] == 6 and result["loss"] > 0
    assert {"perplexity", "exact_match", "contains"} <= set(result)
    assert json.loads(capsys.readouterr().out) == result


def test_chat_reads_stdin(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nConvert May 1, 2000\n/exit\nnever read\n"))
    assert main(["chat", "--adapter", str(trained_run), "--max-new-tokens", "3"]) == 0
    replies = [line for line in capsys.readouterr().out.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2


def test_merge_gives_a_plain_transformers_folder_with_the_same_logits(
    trained_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained_run), "--output", str(merged)]) == 0
    probe = torch.tensor([[1, 50, 900, 4000, 12]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained_run / "adapter")
    with torch.no_grad():
        expected = adapted(input_ids=probe).logits
    # a fresh interpreter where importing petune fails: the folder needs transformers only
    script = (
        "import sys, json, torch; sys.modules['petune'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r}); AutoTokenizer.from_pretrained({str(merged)!r})\n"
        f"print(json.dumps(m(torch.tensor({probe.tolist()})).logits.tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    logits = torch.tensor(json.loads(result.stdout))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(merged).chat_template
    assert main(["merge", "--adapter", str(trained_run), "--output", str(merged)]) == 2  # exists: refused


def test_other_commands_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--adapter", str(tmp_path), "hi"]) == 2
    assert "is not an adapter folder" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "give either a prompt or --file" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "none.jsonl"), "--model", str(tmp_path / "no-model")]) == 2
    assert "Traceback" not in capsys.readouterr().err

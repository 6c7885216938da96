"""`petune export` refuses what it cannot do in one line (exit 2), naming the problem and what to do, and
never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from petune import LoraConfig, PromptTuningConfig
from petune.cli import main
from petune.export import command
from tests.export.conftest import save_adapter
from tests.train.tiny import save_tiny_model


def refused(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """The one-line error of a `petune export` that must exit with status 2."""
    capsys.readouterr()  # what the set-up printed
    assert main(["export", *map(str, args)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("petune export: error: ") and "\n" not in error, error
    return error


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return save_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora"), LoraConfig(r=2, init_lora_weights=False))


def test_dora_to_gguf_lora_is_refused_suggesting_a_merged_gguf(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dora = save_adapter(tiny_model_dir, tmp_path / "dora", LoraConfig(r=2, use_dora=True))
    out = tmp_path / "a.gguf"
    error = refused(capsys, "--model", tiny_model_dir, "--adapter", dora, "--format", "gguf-lora", "--output", out)
    assert "DoRA" in error and "--format gguf" in error
    assert not out.exists()


@pytest.mark.parametrize("format", ["gguf", "gguf-lora"])
def test_a_prompt_method_is_refused_for_gguf_saying_what_is_possible(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], format: str
) -> None:
    prompt = save_adapter(
        tiny_model_dir, tmp_path / "prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    error = refused(
        capsys, "--model", tiny_model_dir, "--adapter", prompt, "--format", format, "--output", tmp_path / "m.gguf"
    )
    assert "virtual tokens" in error and "llama.cpp" in error and "leave out --adapter" in error


@pytest.mark.parametrize(("format", "outtype"), [("gguf", "q5_k"), ("gguf-lora", "q4_0"), ("hf", "q8_0")])
def test_an_outtype_the_format_does_not_take_is_refused_with_the_choices(
    tmp_path: Path, tiny_model_dir: Path, lora: Path, capsys: pytest.CaptureFixture[str], format: str, outtype: str
) -> None:
    args = ["--model", tiny_model_dir, "--adapter", lora, "--format", format, "--outtype", outtype]
    error = refused(capsys, *args, "--output", tmp_path / "out")
    assert f"unknown --outtype {outtype!r}" in error and "f16" in error


def test_an_architecture_without_a_gguf_mapping_is_refused_listing_the_supported(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, capsys: pytest.CaptureFixture[str]
) -> None:
    gpt2 = save_tiny_model(tmp_path / "gpt2", tokenizer, "gpt2", n_embd=32, n_layer=1, n_head=2)
    error = refused(capsys, "--model", gpt2, "--format", "gguf", "--output", tmp_path / "m.gguf")
    assert "'gpt2'" in error and "supported: llama, mistral, qwen2" in error


@pytest.mark.parametrize("format", ["gguf", "gguf-lora", "hf"])
def test_an_existing_output_is_kept_unless_overwrite(
    tmp_path: Path, tiny_model_dir: Path, lora: Path, capsys: pytest.CaptureFixture[str], format: str
) -> None:
    out = tmp_path / "existing"
    out.write_text("keep me")
    args = ["--model", tiny_model_dir, "--adapter", lora, "--format", format, "--output", out]
    assert "already exists; pass --overwrite" in refused(capsys, *args)
    assert out.read_text() == "keep me"
    assert main(["export", *map(str, args), "--overwrite"]) == 0
    assert out.is_dir() if format == "hf" else out.read_bytes()[:4] == b"GGUF"


def test_a_failed_export_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_halfway(model: object, tokenizer: object, outtype: object, path: Path, name: str) -> None:
        path.write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    monkeypatch.setattr("petune.export.gguf_model.write_model_gguf", fail_halfway)
    out = tmp_path / "m.gguf"
    out.write_text("previous")
    assert (
        main(["export", "--model", str(tiny_model_dir), "--format", "gguf", "--output", str(out), "--overwrite"]) == 130
    )
    assert out.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert command.FORMATS == ("gguf", "gguf-lora", "hf")

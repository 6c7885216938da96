"""Fixtures: a tiny Llama saved as a local HF folder with the embedded model's tokenizer (chat template included).

Built once per session: `petune train --model <folder>` then runs in seconds, without any hub. Also the
helpers that read what a run saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from petune.embedded import embedded_model_dir

QUESTIONS = ["Convert {d} to ISO.", "ISO form of {d}?", "Write {d} as YYYY-MM-DD."]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Path:
    """A random 2-layer, hidden-32 Llama whose vocabulary is SmolLM2's, saved with that tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer, "llama", tie_word_embeddings=True)


def save_tiny_model(
    folder: Path, tokenizer: PreTrainedTokenizerBase, model_type: str = "llama", seed: int = 0, **overrides: object
) -> Path:
    """Save a random 2-layer, hidden-32 `model_type` (llama, qwen2, mistral...) with SmolLM2's vocabulary and
    tokenizer into `folder`; 4 query heads share 2 key/value heads. Returns `folder`."""
    torch.manual_seed(seed)
    settings: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat_rows(count: int, start: int = 0) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(start, start + count):
        date = f"March {i % 28 + 1}, {1990 + i}"
        answer = f"{1990 + i}-03-{i % 28 + 1:02d}"
        question = QUESTIONS[i % len(QUESTIONS)].format(d=date)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, held-out) chat files of 24 and 6 records."""
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "train.jsonl", chat_rows(24)), write_jsonl(folder / "val.jsonl", chat_rows(6, 100))


def tiny_args(model: Path, data: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    """`petune train` arguments for a run of a few seconds on the tiny model."""
    train, val = data
    return [
        "train", "--model", str(model), "--data", str(train), "--val-data", str(val), "--output", str(output),
        "--max-steps", "4", "--batch-size", "4", "--eval-every", "2", "--save-every", "2", "--eval-samples", "2",
        "--lr", "1e-2", "--max-length", "64", *extra,
    ]  # fmt: skip


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    """What a run saved: its adapter, or for --method full the whole model."""
    adapter = run / "adapter" / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else run / "model" / "model.safetensors")


def assert_every_weight_moved(run: Path, base_dir: Path) -> None:
    """Full fine-tuning: every tensor of the saved model differs from the base model's."""
    trained, base = trained_tensors(run), load_file(base_dir / "model.safetensors")
    assert trained.keys() == base.keys()
    assert [k for k in base if torch.equal(trained[k], base[k])] == []

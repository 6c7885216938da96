"""`petune export` formats, checked with transformers' own GGUF reader and gguf's: no llama.cpp needed.

Reference: the adapted model in petune (unmerged), whose logits the exported GGUF must give back when
transformers loads it with `gguf_file=` (which undoes llama.cpp's q/k permutation), and the merged
f32 GGUF for the LoRA file (base + alpha / r * B A must equal it, tensor by tensor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from petune import LoraConfig, PeftModel
from petune.cli import main
from tests.export.conftest import save_adapter
from tests.train.tiny import save_tiny_model

Q = GGMLQuantizationType
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# rsLoRA plus per-module ranks and alphas: all three must be folded into the single alpha of a GGUF LoRA
FOLDED = {"use_rslora": True, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"v_proj": 3.0, "down_proj": 12.0}}


def export(*args: str | Path) -> None:
    assert main(["export", *map(str, args)]) == 0


def tensors(source: Path | GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, in Hugging Face's (rows, columns) order."""
    reader = source if isinstance(source, GGUFReader) else GGUFReader(source)
    return {t.name: quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist()) for t in reader.tensors}


def field(path: Path, key: str) -> object:
    return GGUFReader(path).fields[key].contents()


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {"tie_word_embeddings": False}),  # q/k/v biases, an output matrix of its own
        ("mistral", {"tie_word_embeddings": False, "sliding_window": None}),
    ],
)
def test_merged_gguf_loads_in_transformers_with_the_adapted_logits(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, model_type: str, overrides: dict[str, object]
) -> None:
    model_dir = save_tiny_model(tmp_path / model_type, tokenizer, model_type, **overrides)
    adapter = save_adapter(
        model_dir, tmp_path / "adapter", LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, **FOLDED)
    )
    export(
        "--model",
        model_dir,
        "--adapter",
        adapter,
        "--format",
        "gguf",
        "--outtype",
        "f32",
        "--output",
        tmp_path / "out" / "m.gguf",
    )

    ids = torch.tensor([tokenizer("Convert March 3, 1999 to ISO.")["input_ids"]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf").eval()
    with torch.no_grad():
        expected, got = adapted(ids).logits, exported(ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3), "the adapter changes nothing: the test would prove nothing"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert field(tmp_path / "out" / "m.gguf", "general.architecture") == ("qwen2" if model_type == "qwen2" else "llama")
    assert "FROM ./m.gguf" in (tmp_path / "out" / "m.Modelfile").read_text()


def test_gguf_lora_plus_base_equals_the_merged_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """llama.cpp adds alpha / r * B A to each base matrix; that must be the merged model's weight."""
    adapter = save_adapter(
        tiny_model_dir,
        tmp_path / "adapter",
        LoraConfig(r=4, target_modules=TARGETS, lora_alpha=8, init_lora_weights=False, **FOLDED),
    )
    common = ["--model", tiny_model_dir, "--outtype", "f32"]
    export(*common, "--format", "gguf", "--output", tmp_path / "base.gguf")
    export(*common, "--adapter", adapter, "--format", "gguf", "--output", tmp_path / "merged.gguf")
    export(*common, "--adapter", adapter, "--format", "gguf-lora", "--output", tmp_path / "lora.gguf")

    reader = GGUFReader(tmp_path / "lora.gguf")
    kind, adapter_type, alpha = (
        reader.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha")
    )
    assert (kind, adapter_type, alpha) == ("adapter", "lora", 8.0)
    base, merged, lora = tensors(tmp_path / "base.gguf"), tensors(tmp_path / "merged.gguf"), tensors(reader)
    pairs = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert len(pairs) == 2 * len(TARGETS) and "blk.0.attn_q.weight" in pairs
    assert lora["blk.0.attn_k.weight.lora_a"].shape == (2, 32)  # rank_pattern: (r, in)
    assert lora["blk.0.attn_k.weight.lora_b"].shape == (16, 2)  # (out, r): 2 kv heads of 8
    for name in pairs:
        down, up = lora[name + ".lora_a"], lora[name + ".lora_b"]
        delta = 8.0 / down.shape[0] * up @ down
        np.testing.assert_allclose(base[name] + delta, merged[name], rtol=0, atol=1e-5, err_msg=name)
    assert "ADAPTER ./lora.gguf" in (tmp_path / "lora.Modelfile").read_text()


@pytest.fixture(scope="module")
def f32_tensors(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("f32") / "f32.gguf"
    export("--model", tiny_model_dir, "--format", "gguf", "--outtype", "f32", "--output", path)
    return tensors(path)


@pytest.mark.parametrize(
    ("outtype", "matrices", "vocabulary", "tolerance"),
    [("bf16", Q.BF16, Q.BF16, 1e-2), ("q8_0", Q.Q8_0, Q.Q8_0, 2e-2), ("q4_0", Q.Q4_0, Q.Q8_0, 0.25)],
)
def test_outtypes_store_each_tensor_in_its_type_close_to_f32(
    tmp_path: Path,
    tiny_model_dir: Path,
    f32_tensors: dict[str, np.ndarray],
    outtype: str,
    matrices: Q,
    vocabulary: Q,
    tolerance: float,
) -> None:
    export("--model", tiny_model_dir, "--format", "gguf", "--outtype", outtype, "--output", tmp_path / "x.gguf")
    reader = GGUFReader(tmp_path / "x.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == matrices and types["blk.1.ffn_down.weight"] == matrices
    assert types["token_embd.weight"] == vocabulary
    assert types["blk.0.attn_norm.weight"] == Q.F32  # vectors stay f32
    stored = tensors(reader)
    assert f32_tensors.keys() == stored.keys()
    for name, values in f32_tensors.items():
        error = np.abs(stored[name] - values).max() / np.abs(values).max()
        assert error < tolerance, f"{name}: relative error {error:.3g}"

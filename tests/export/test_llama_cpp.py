"""The exported GGUF files run in llama.cpp itself (llama-cpp-python) as the model runs in transformers.

On the embedded SmolLM2-135M-Instruct with a small random LoRA (rsLoRA, per-module rank and alpha, so the
folding into one alpha is checked too). Reference: transformers' greedy decoding on the merged HF model.
llama-cpp-python is installed by `make llama-cpp` (scripts/llama_cpp_wheel.sh); `make unit` sets
PETUNE_REQUIRE_LLAMA_CPP=1 so that these tests fail, rather than skip, where it is missing.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from petune import LoraConfig, PeftModel
from petune.cli import main
from petune.embedded import embedded_model_dir
from petune.train.commands import merged_model
from tests.export.conftest import save_adapter
from tests.train.tiny import save_tiny_model

pytestmark = pytest.mark.real_model

PROMPTS = ["Convert March 3, 1999 to ISO.", "What is the capital of France?", "Write 2024-07-01 in words."]
NEW_TOKENS = 16
AGREEMENT = 0.9  # q8_0: share of next-token predictions equal to transformers' (teacher-forced)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = LoraConfig(
    r=8,
    target_modules=TARGETS,
    init_lora_weights=False,
    use_rslora=True,
    rank_pattern={"k_proj": 4},
    alpha_pattern={"v_proj": 16.0},
)


@pytest.fixture(scope="module")
def llama_cpp() -> ModuleType:
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        message = "llama-cpp-python is not installed: run `make llama-cpp`"
        if os.environ.get("PETUNE_REQUIRE_LLAMA_CPP"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The adapter and its exports: merged f16 and q8_0, base f16, LoRA f16."""
    folder = tmp_path_factory.mktemp("llama-cpp")
    adapter = save_adapter(embedded_model_dir(), folder / "adapter", ADAPTER, scale=0.02)
    paths = {name: folder / f"{name}.gguf" for name in ("merged_f16", "merged_q8_0", "base_f16", "lora_f16")}
    jobs = [
        ("merged_f16", ["--adapter", adapter, "--format", "gguf", "--outtype", "f16"]),
        ("merged_q8_0", ["--adapter", adapter, "--format", "gguf", "--outtype", "q8_0"]),
        ("base_f16", ["--format", "gguf", "--outtype", "f16"]),
        ("lora_f16", ["--adapter", adapter, "--format", "gguf-lora", "--outtype", "f16"]),
    ]
    for name, args in jobs:
        assert main(["export", "--model", "embedded", *map(str, args), "--output", str(paths[name])]) == 0
    return {"adapter": adapter, **paths}


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> tuple[PreTrainedTokenizerBase, list[list[int]], list[list[int]]]:
    """The tokenizer, the chat-templated prompt ids, and transformers' greedy tokens on the merged model."""
    model, tokenizer = merged_model("embedded", str(files["adapter"]))
    prompts = [chat_ids(tokenizer, text) for text in PROMPTS]
    outputs = []
    for ids in prompts:
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        outputs.append(generated[0, len(ids) :].tolist())
    return tokenizer, prompts, outputs


def chat_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def greedy(llama_cpp: ModuleType, model: Path, prompts: list[list[int]], eos: int, **options: Any) -> list[list[int]]:
    """llama.cpp's greedy continuation (at most NEW_TOKENS, up to eos included) of each prompt.

    One thread: llama.cpp's threads spin-wait for each other, and on cores shared with other processes two
    took 219 s where one takes 2 s (this test, same machine, same hour)."""
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_threads=1, verbose=False, **options)
    outputs = []
    for ids in prompts:
        llm.reset()
        tokens: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if token == eos or len(tokens) == NEW_TOKENS:
                break
        outputs.append(tokens)
    return outputs


def test_llama_cpp_tokenises_the_chat_prompt_as_the_hf_tokenizer(
    llama_cpp: ModuleType, files: dict[str, Path], reference: Any
) -> None:
    tokenizer, prompts, _ = reference
    llm = llama_cpp.Llama(model_path=str(files["merged_f16"]), n_ctx=256, vocab_only=True, verbose=False)
    for text, ids in zip(PROMPTS, prompts, strict=True):
        templated = tokenizer.decode(ids)
        assert llm.tokenize(templated.encode(), add_bos=False, special=True) == ids, text


def test_merged_f16_in_llama_cpp_generates_what_transformers_generates(
    llama_cpp: ModuleType, files: dict[str, Path], reference: Any
) -> None:
    tokenizer, prompts, expected = reference
    got = greedy(llama_cpp, files["merged_f16"], prompts, tokenizer.eos_token_id)
    assert [tokenizer.decode(t) for t in got] == [tokenizer.decode(t) for t in expected]
    base = greedy(llama_cpp, files["base_f16"], prompts[:1], tokenizer.eos_token_id)
    assert base != got[:1], "the adapter changes nothing: the test would prove nothing"


def test_base_with_the_gguf_lora_in_llama_cpp_generates_what_the_merged_model_does(
    llama_cpp: ModuleType, files: dict[str, Path], reference: Any
) -> None:
    tokenizer, prompts, expected = reference
    got = greedy(llama_cpp, files["base_f16"], prompts, tokenizer.eos_token_id, lora_path=str(files["lora_f16"]))
    assert [tokenizer.decode(t) for t in got] == [tokenizer.decode(t) for t in expected]


def test_q8_0_in_llama_cpp_agrees_with_transformers_on_most_tokens(
    llama_cpp: ModuleType, files: dict[str, Path], reference: Any
) -> None:
    """8-bit weights flip near-ties (this random adapter makes some: 0.05 apart on the first token), so the
    measure is teacher-forced: along transformers' answers, llama.cpp's most likely next token is the same at
    >= 90% of the positions (measured on this machine: 46 of 48)."""
    _, prompts, expected = reference
    llm = llama_cpp.Llama(model_path=str(files["merged_q8_0"]), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    same = total = 0
    for ids, answer in zip(prompts, expected, strict=True):
        llm.reset()
        llm.eval(ids + answer)
        predicted = [int(llm.scores[position].argmax()) for position in range(len(ids) - 1, len(ids) + len(answer) - 1)]
        same += sum(p == a for p, a in zip(predicted, answer, strict=True))
        total += len(answer)
    print(f"q8_0 teacher-forced agreement: {same}/{total}")
    assert same / total >= AGREEMENT


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny sentencepiece-style BPE (Llama 1/2, Mistral): `▁` for spaces, bytes for what has no piece."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "c", "d", "▁a", "ab", "▁ab", "cd", "▁cd"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b"), ("c", "d"), ("▁", "cd")]
    spec = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    spec.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spec.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spec.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=spec, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_style_vocabulary_tokenises_in_llama_cpp_as_in_transformers(
    llama_cpp: ModuleType, tmp_path: Path
) -> None:
    tokenizer = llama_style_tokenizer()
    model_dir = save_tiny_model(tmp_path / "llama", tokenizer, "llama", tie_word_embeddings=True)
    out = tmp_path / "m.gguf"
    assert (
        main(["export", "--model", str(model_dir), "--format", "gguf", "--outtype", "f32", "--output", str(out)]) == 0
    )
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in ["ab cd", "abcd ab xyz", "é ab\n cd"]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {"tie_word_embeddings": True}),
        ("qwen2", {"tie_word_embeddings": False}),  # q/k/v biases, an output matrix of its own, rope theta 1e6
        ("mistral", {"tie_word_embeddings": False, "sliding_window": None}),
    ],
)
def test_each_architecture_computes_in_llama_cpp_what_it_computes_in_transformers(
    llama_cpp: ModuleType, tmp_path: Path, model_type: str, overrides: dict[str, object]
) -> None:
    """The tensor layouts (Llama's and Mistral's q/k permutation, Qwen2's biases) as llama.cpp reads them: the
    merged f32 export and the base + GGUF LoRA give the adapted model's logits at every position of a chat
    prompt, to 1e-4 (measured: 2e-6; the adapter moves them by 0.77-0.84). llama.cpp's KV cache in f32 here: its
    default f16 cache alone moves them by up to 2e-3."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model_dir = save_tiny_model(tmp_path / model_type, tokenizer, model_type, **overrides)
    config = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, use_rslora=True)
    adapter = save_adapter(model_dir, tmp_path / "adapter", config)
    exports = {
        "merged": ["--adapter", adapter, "--format", "gguf"],
        "base": ["--format", "gguf"],
        "lora": ["--adapter", adapter, "--format", "gguf-lora"],
    }
    for name, args in exports.items():
        command = ["export", "--model", model_dir, *args, "--outtype", "f32", "--output", tmp_path / f"{name}.gguf"]
        assert main(list(map(str, command))) == 0

    ids = chat_ids(tokenizer, PROMPTS[0])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    with torch.no_grad():
        expected = adapted(torch.tensor([ids])).logits[0].numpy()
        base = AutoModelForCausalLM.from_pretrained(model_dir)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(expected - base).max() > 0.1, "the adapter changes nothing: the test would prove nothing"
    runs = {"merged": {}, "base + lora": {"lora_path": str(tmp_path / "lora.gguf")}}
    for name, options in runs.items():
        model = tmp_path / ("merged.gguf" if name == "merged" else "base.gguf")
        llm = llama_cpp.Llama(
            model_path=str(model), n_ctx=256, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0, **options
        )
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
        assert np.abs(got - expected).max() < 1e-4, name  # measured: 2e-6 at most

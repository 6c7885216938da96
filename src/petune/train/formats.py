"""Data beyond JSONL/JSON/CSV: Parquet and Arrow files, `datasets` folders, and ShareGPT conversations.

    data.parquet                  Parquet (pyarrow), one row per record
    data.arrow / data.feather     Arrow IPC, file or stream format (what `datasets` writes)
    folder/                       a `datasets.Dataset.save_to_disk` folder (one split)
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
                                  ShareGPT, as LLaMA-Factory reads it: a chat record in other words

The readers return what `data.read_rows` does for the text formats, `(location, record)` pairs, with
`location` = "file: record N" (1-based), so every later error names the record. A null cell is a
field the record does not have, as an empty CSV cell is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from petune.train import UserError

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
INSTALL = "pip install datasets pyarrow (petune's 'data' extra)"

# ShareGPT's "from" -> the chat template's role. LLaMA-Factory's names (human, gpt, system, function_call,
# observation; its `sharegpt` formatting defaults) and the chat names themselves. A function call is
# something the assistant writes (trained on); an observation is a tool's answer (prompt).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def read_table_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a Parquet or Arrow IPC (file or stream format) file."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path.suffix} files needs pyarrow: {INSTALL}") from None
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_file(source).read_all()
                except pa.ArrowInvalid:  # `datasets` writes the stream format
                    source.seek(0)
                    table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable {path.suffix} file ({error})") from None
    return _records(path, table.to_pylist())


def read_saved_dataset(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a folder written by `datasets.Dataset.save_to_disk`; a `DatasetDict` folder names its splits."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{path} is a folder; reading a datasets save_to_disk folder needs datasets: {INSTALL}"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"{path} is a folder but not one written by datasets' save_to_disk; give a data file or such a folder"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(loaded)
        first = next(iter(loaded), "train")
        raise UserError(f"{path} holds several splits ({splits}); give one split's folder, e.g. --data {path / first}")
    return _records(path, loaded.to_list())


def _records(path: Path, rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path}: record {number}", {k: v for k, v in row.items() if v is not None})
        for number, row in enumerate(rows, start=1)
    ]


def sharegpt_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A ShareGPT record's `conversations` (and optional top-level `system`) as chat messages."""
    turns = row["conversations"]
    if isinstance(turns, str):  # a CSV column holding JSON
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: 'conversations' is not valid JSON ({error.msg})") from None
    shape = "a non-empty list of {'from': ..., 'value': ...} objects"
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: 'conversations' must be {shape}")
    if "tools" in row:
        raise UserError(f"{where}: ShareGPT records with 'tools' are not supported; drop the field to train without it")
    messages = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{where}: conversations[{index}] is {turn!r:.80}; each turn must be {shape}")
        role = SHAREGPT_ROLES.get(str(turn["from"]))
        if role is None:
            known = ", ".join(SHAREGPT_ROLES)
            raise UserError(
                f"{where}: conversations[{index}] is from {turn['from']!r}, a role petune does not know; "
                f"use one of: {known}"
            )
        messages.append({"role": role, "content": str(turn["value"])})
    return messages

"""Parquet, Arrow and `datasets` folders read as the same records as JSONL; ShareGPT read as chat."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerBase

from petune.train import UserError
from petune.train.data import load_records, parse_prompt, parse_record, read_rows, tokenize
from tests.train.tiny import chat_rows, write_jsonl

ROWS: list[dict[str, object]] = [
    {"prompt": "a", "completion": "b"},
    {"instruction": "c", "input": "", "output": "d"},
    *chat_rows(2),
]


def segments(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[list[tuple[str, bool]]]:
    return [record.segments for record in load_records(path, tokenizer)]


def write_arrow_file(path: Path, table: pa.Table) -> Path:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def test_parquet_arrow_and_saved_dataset_give_the_records_jsonl_does(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    expected = segments(write_jsonl(tmp_path / "d.jsonl", ROWS), tokenizer)
    # one column per field of any record (from_pylist would keep the first record's only): other fields are nulls
    table = pa.Table.from_struct_array(pa.array(ROWS))
    pq.write_table(table, tmp_path / "d.parquet")
    write_arrow_file(tmp_path / "d.arrow", table)
    dataset = datasets.Dataset.from_dict(table.to_pydict())
    dataset.save_to_disk(str(tmp_path / "saved"))
    (stream_file,) = (tmp_path / "saved").glob("*.arrow")  # datasets' own files: Arrow's stream format
    for path in [tmp_path / "d.parquet", tmp_path / "d.arrow", tmp_path / "saved", stream_file]:
        assert segments(path, tokenizer) == expected, path
    assert read_rows(tmp_path / "d.parquet")[2][0] == f"{tmp_path / 'd.parquet'}: record 3"


def test_a_saved_dataset_dict_names_its_splits(tmp_path: Path) -> None:
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)})
    splits.save_to_disk(str(tmp_path / "both"))
    with pytest.raises(
        UserError, match=re.escape("holds several splits (train, test); give one split's folder, e.g. ")
    ):
        read_rows(tmp_path / "both")
    assert len(read_rows(tmp_path / "both" / "train")) == len(ROWS)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("folder", None, "not one written by datasets' save_to_disk"),
        ("broken.parquet", b"not parquet at all", "not a readable .parquet file"),
        ("broken.arrow", b"not arrow at all", "not a readable .arrow file"),
    ],
)
def test_unreadable_tables(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_rows(path)


def test_parquet_missing_columns_names_file_record_and_fields(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "a", "answer": "b"}]), path)
    expected = f"{path}: record 1: record has fields ['answer', 'question']; expected prompt + completion, "
    with pytest.raises(UserError, match=re.escape(expected)):
        load_records(path, tokenizer)


def sharegpt(*turns: tuple[str, str], **extra: object) -> dict[str, object]:
    return {"conversations": [{"from": role, "value": text} for role, text in turns], **extra}


def test_sharegpt_is_the_chat_record_of_the_same_conversation(tokenizer: PreTrainedTokenizerBase) -> None:
    row = sharegpt(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello!"), ("human", "Bye"), ("gpt", "Goodbye!"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ]
    record = parse_record(row, "x:1", tokenizer)
    assert record == parse_record({"messages": messages}, "x:1", tokenizer)
    example, _ = tokenize(record, tokenizer, 256, train_on_prompt=False)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = parse_prompt(row, "x:1", tokenizer)
    assert prompt == (tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True), True)


def test_sharegpt_llama_factory_system_field_and_tool_roles(tokenizer: PreTrainedTokenizerBase) -> None:
    row = sharegpt(
        ("human", "Age of someone born 1990?"),
        ("function_call", '{"name": "age", "arguments": {"year": 1990}}'),
        ("observation", '{"age": 36}'),
        ("gpt", "36."),
        system="You can call tools.",
    )
    record = parse_record(row, "x:1", tokenizer)
    roles = ["system", "user", "assistant", "tool", "assistant"]
    texts = ["You can call tools.", *(str(turn["value"]) for turn in row["conversations"])]  # type: ignore[attr-defined]
    messages = [{"role": r, "content": t} for r, t in zip(roles, texts, strict=True)]
    assert record == parse_record({"messages": messages}, "x:1", tokenizer)
    completions = [text for text, is_completion in record.segments if is_completion]
    assert len(completions) == 2 and "age" in completions[0] and "36." in completions[1]


def test_sharegpt_in_jsonl_and_parquet(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [sharegpt(("human", f"Q{i}"), ("gpt", f"A{i}")) for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    from_jsonl = load_records(write_jsonl(tmp_path / "s.jsonl", rows), tokenizer)
    assert [r.reference for r in from_jsonl] == ["A0", "A1", "A2"]
    assert segments(tmp_path / "s.parquet", tokenizer) == [r.segments for r in from_jsonl]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            sharegpt(("human", "Hi"), ("bot", "Hello")),
            "conversations[1] is from 'bot', a role petune does not know; use one of: human, user, gpt,",
        ),
        (sharegpt(("human", "Hi")), "a chat record needs at least one message with role 'assistant'"),
        ({"conversations": []}, "'conversations' must be a non-empty list of {'from': ..., 'value': ...}"),
        ({"conversations": [{"role": "user", "content": "Hi"}]}, r"conversations[0] is {'role': 'user'"),
        (
            sharegpt(("human", "Hi"), ("gpt", "Yo"), tools="[]"),
            "ShareGPT records with 'tools' are not supported; drop the field",
        ),
    ],
)
def test_bad_sharegpt_records_name_the_file_record_and_fix(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, row: dict[str, object], message: str
) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [sharegpt(("human", "Q"), ("gpt", "A")), row])
    with pytest.raises(UserError, match=re.escape(f"{path}:2: {message}")):
        load_records(path, tokenizer)


def test_sharegpt_csv_column_holds_json(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    path = tmp_path / "s.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["conversations"], [json.dumps(turns)]])
    (record,) = load_records(path, tokenizer)
    assert record.templated and record.reference == "Hello"

"""Data files and formats -> token ids and loss masks (the embedded model's tokenizer and chat template)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from petune.train import UserError
from petune.train.data import (
    IGNORE_INDEX,
    Example,
    collate,
    load_dataset,
    load_records,
    pack,
    parse_record,
    read_rows,
    tokenize,
)
from tests.train.tiny import chat_rows, write_jsonl


def trained_text(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


def test_prompt_completion_masks_the_prompt_and_appends_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    record = parse_record({"prompt": "2 + 2 =", "completion": " 4"}, "x:1", tokenizer)
    example, truncated = tokenize(record, tokenizer, 64, train_on_prompt=False)
    prompt_ids = tokenizer("2 + 2 =")["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert trained_text(example, tokenizer) == " 4" + tokenizer.eos_token
    assert not truncated and record.reference == "4" and record.prompt == "2 + 2 ="


def test_train_on_prompt_labels_every_token(tokenizer: PreTrainedTokenizerBase) -> None:
    record = parse_record({"prompt": "2 + 2 =", "completion": " 4"}, "x:1", tokenizer)
    example, _ = tokenize(record, tokenizer, 64, train_on_prompt=True)
    assert example.labels == example.input_ids


@pytest.mark.parametrize("extra", ["", "some context"])
def test_alpaca_uses_alpacas_prompt(tokenizer: PreTrainedTokenizerBase, extra: str) -> None:
    row = {"instruction": "Say hi", "input": extra, "output": "hi"}
    record = parse_record(row, "x:1", tokenizer)
    assert record.prompt.startswith("Below is an instruction")
    assert record.prompt.endswith("### Response:\n")
    assert ("### Input:\nsome context" in record.prompt) == bool(extra)
    example, _ = tokenize(record, tokenizer, 128, train_on_prompt=False)
    assert trained_text(example, tokenizer) == "hi" + tokenizer.eos_token


def test_chat_trains_on_every_assistant_turn_only(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ]
    record = parse_record({"messages": messages}, "x:1", tokenizer)
    example, _ = tokenize(record, tokenizer, 256, train_on_prompt=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full  # the template's rendering, token for token
    assert trained_text(example, tokenizer) == "Hello!<|im_end|>\nGoodbye!<|im_end|>\n"
    assert record.reference == "Goodbye!" and record.question == "Bye"
    assert record.prompt.endswith("<|im_start|>assistant\n")
    assert record.prompt == tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)


def test_chat_without_an_assistant_turn_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(UserError, match="x:3: a chat record needs at least one message with role 'assistant'"):
        parse_record({"messages": [{"role": "user", "content": "Hi"}]}, "x:3", tokenizer)


def test_jsonl_json_and_csv_give_the_same_records(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [{"prompt": "a", "completion": "b"}, {"instruction": "c", "input": "", "output": "d"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion", "instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"prompt": "a", "completion": "b"})
        writer.writerow({"instruction": "c", "input": "", "output": "d"})
    loaded = {suffix: load_records(tmp_path / f"d.{suffix}", tokenizer) for suffix in ("jsonl", "json", "csv")}
    assert [r.segments for r in loaded["jsonl"]] == [r.segments for r in loaded["json"]]
    assert [r.segments for r in loaded["csv"]] == [r.segments for r in loaded["json"]]


def test_csv_chat_column_holds_json(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    messages = chat_rows(1)[0]["messages"]
    with (tmp_path / "chat.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(messages)])
    (record,) = load_records(tmp_path / "chat.csv", tokenizer)
    assert record.templated and record.reference == "1990-03-01"


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(UserError, match=rf"{path}:3: not valid JSON"):
        read_rows(path)


def test_record_missing_fields_names_record_and_expected_fields(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"question": "a", "answer": "b"}])
    with pytest.raises(UserError, match=rf"{path}:2: record has fields \['answer', 'question'\]; expected prompt"):
        load_records(path, tokenizer)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.jsonl", "\n\n", "holds no records"),
        ("list.json", "[]", "holds no records"),
        ("data.txt", "hello", "unsupported data file type '.txt'"),
        ("scalar.jsonl", "3\n", "a record must be an object"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
        read_rows(tmp_path / name)
    with pytest.raises(UserError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")


def test_truncation_is_counted_and_a_prompt_past_max_length_refused(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    rows = [{"prompt": "short", "completion": " word " * 40}, {"prompt": "short", "completion": " ok"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_dataset(tokenizer, str(path), None, 0.0, max_length=16)
    assert data.truncated == 1 and max(len(e.input_ids) for e in data.train) == 16
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 40, "completion": " ok"}])
    with pytest.raises(UserError, match=rf"{path}:1: the prompt is \d+ tokens, but --max-length is 16"):
        load_dataset(tokenizer, str(path), None, 0.0, max_length=16)


def test_packing_keeps_every_token_and_the_limit() -> None:
    examples = [Example([i] * n, [i] * n) for i, n in enumerate([5, 4, 3, 6, 2], start=1)]
    rows = pack(examples, max_length=9)
    assert [len(r.input_ids) for r in rows] == [9, 9, 2]
    assert [t for r in rows for t in r.input_ids] == [t for e in examples for t in e.input_ids]


def test_validation_split_by_fraction_is_disjoint_and_seeded(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    first = load_dataset(tokenizer, str(path), None, 0.25, max_length=128, seed=3)
    again = load_dataset(tokenizer, str(path), None, 0.25, max_length=128, seed=3)
    assert len(first.val) == 5 and len(first.train) == 15
    assert [r.reference for r in first.val_records] == [r.reference for r in again.val_records]
    train_ids = {tuple(e.input_ids) for e in first.train}
    assert not train_ids & {tuple(e.input_ids) for e in first.val}


def test_default_is_the_bundled_demo_set(tokenizer: PreTrainedTokenizerBase) -> None:
    data = load_dataset(tokenizer, None, None, 0.1, max_length=128)
    assert data.train_records == 400 and len(data.val_records) == 60
    assert all(len(r.reference) == 10 and r.reference[4] == "-" for r in data.val_records)


def test_collate_pads_right_and_masks_padding() -> None:
    batch = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]

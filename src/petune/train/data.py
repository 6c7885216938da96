"""Training data: files -> records -> token ids with a loss mask -> padded batches.

Four record shapes are understood, one per record (a file may mix them):

    {"prompt": ..., "completion": ...}                       text; the completion is followed by EOS
    {"instruction": ..., "input": ..., "output": ...}        Alpaca, rendered with Alpaca's prompt
    {"messages": [{"role": ..., "content": ...}, ...]}       chat, rendered with the tokenizer's template
    {"conversations": [{"from": ..., "value": ...}, ...]}    ShareGPT: chat in other words (formats.py)

in .jsonl, .json, .csv, .parquet and .arrow files or a `datasets` save_to_disk folder (formats.py).

A record becomes `segments`: pieces of text marked prompt or completion. Each piece is tokenised on
its own, so the model trains on exactly the tokens it will see when it generates after the prompt.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from petune.files import read_text
from petune.train import UserError
from petune.train.formats import TABLE_SUFFIXES, read_saved_dataset, read_table_file, sharegpt_messages

T = TypeVar("T")
IGNORE_INDEX = -100  # label of a token that carries no loss (cross_entropy's ignore_index)
DEMO_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_TRAIN, DEMO_VAL = DEMO_DIR / "demo_train.jsonl", DEMO_DIR / "demo_val.jsonl"
EXPECTED = "prompt + completion, instruction (+ input) + output, messages, or conversations (ShareGPT)"
FILE_TYPES = ".jsonl, .json, .csv, .parquet or .arrow, or a datasets save_to_disk folder"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass
class Record:
    """One record as text. `templated`: the text already holds special tokens (a chat template)."""

    segments: list[tuple[str, bool]]  # (text, is_completion), in order
    reference: str  # the expected answer: the (last) completion, for accuracy
    templated: bool
    where: str  # "file:line", for messages
    question: str = ""  # the request alone (last user message, instruction or prompt), for display

    @property
    def prompt(self) -> str:
        """Everything before the last completion: what generation starts from."""
        last = max(i for i, (_, is_completion) in enumerate(self.segments) if is_completion)
        return "".join(text for text, _ in self.segments[:last])


@dataclass
class Example:
    """A tokenised record: `labels[i]` is `input_ids[i]`, or IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # packed rows only: positions restarting at 0 for each example


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, raw record) for each record of a data file or `datasets` folder (FILE_TYPES)."""
    path = Path(path)
    suffix = path.suffix.lower()
    rows: list[tuple[str, Any]] = []
    if path.is_dir():
        rows = read_saved_dataset(path)
    elif suffix in TABLE_SUFFIXES:
        rows = read_table_file(path)
    elif path.is_file() and suffix not in (".jsonl", ".json", ".csv"):
        raise UserError(f"{path}: unsupported data file type {suffix or '(none)'!r}; use {FILE_TYPES}")
    else:
        rows = _text_rows(path, suffix, read_text(path, "data file", f"pass a UTF-8 file of records ({FILE_TYPES})"))
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: a record must be an object with fields ({EXPECTED}), got {row!r:.80}")
    if not rows:
        raise UserError(f"{path} holds no records")
    return rows


def _text_rows(path: Path, suffix: str, text: str) -> list[tuple[str, Any]]:
    """(location, record) of a .jsonl, .json or .csv file's text."""
    if suffix == ".jsonl":
        lines = enumerate(text.splitlines(), start=1)
        return [(f"{path}:{number}", _json(line, f"{path}:{number}")) for number, line in lines if line.strip()]
    if suffix == ".json":
        data = _json(text, str(path))
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
        return [(f"{path}: record {number}", item) for number, item in enumerate(data, start=1)]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # a CSV row has every column: an empty cell is a field the record does not have
    return [(f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v}) for row in reader]


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from None


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None or isinstance(value, dict | list):
        raise UserError(f"{where}: field {key!r} must be text, got {value!r:.80}")
    return str(value)


def parse_record(row: dict[str, Any], where: str, tokenizer: PreTrainedTokenizerBase) -> Record:
    """A training record, whatever its shape; an error naming the record and the fields expected."""
    row = _sharegpt_as_chat(row, where)
    if "messages" in row:
        return _chat_record(_messages(row, where), where, tokenizer)
    if "prompt" in row and "completion" in row:
        prompt, completion = _text(row, "prompt", where), _text(row, "completion", where)
        return Record([(prompt, False), (completion, True)], completion.strip(), False, where, prompt.strip())
    if "instruction" in row and "output" in row:
        output = _text(row, "output", where)
        segments = [(_alpaca_prompt(row, where), False), (output, True)]
        return Record(segments, output.strip(), False, where, _text(row, "instruction", where))
    raise UserError(f"{where}: record has fields {sorted(row)}; expected {EXPECTED}")


def parse_prompt(row: dict[str, Any], where: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """(prompt text, templated) of a record to generate from; a trailing answer, if any, is left out."""
    row = _sharegpt_as_chat(row, where)
    if "messages" in row:
        messages = _messages(row, where, need_answer=False)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _apply_template(tokenizer, messages, where, True), True
    if "prompt" in row:
        return _text(row, "prompt", where), False
    if "instruction" in row:
        return _alpaca_prompt(row, where), False
    raise UserError(
        f"{where}: record has fields {sorted(row)}; expected prompt, instruction (+ input), messages or conversations"
    )


def _sharegpt_as_chat(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A ShareGPT record as a chat record (`messages`); any other record as it is."""
    return {**row, "messages": sharegpt_messages(row, where)} if "conversations" in row else row


def _alpaca_prompt(row: dict[str, Any], where: str) -> str:
    extra = str(row.get("input") or "")
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if extra else "",
        instruction=_text(row, "instruction", where),
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )


def _messages(row: dict[str, Any], where: str, need_answer: bool = True) -> list[dict[str, str]]:
    messages = row["messages"]
    if isinstance(messages, str):  # a CSV column holding JSON
        messages = _json(messages, where)
    ok = isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
    if ok and all({"role", "content"} <= set(m) for m in messages):
        if not need_answer or any(m["role"] == "assistant" for m in messages):
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        raise UserError(f"{where}: a chat record needs at least one message with role 'assistant' to learn from")
    raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} objects")


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str, gen: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where}: chat records need a tokenizer with a chat template, and this one has none")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as error:  # jinja raises its own errors for conversations a template rejects
        raise UserError(f"{where}: the chat template rejected this conversation: {error}") from None
    return str(text)


def _chat_record(messages: list[dict[str, str]], where: str, tokenizer: PreTrainedTokenizerBase) -> Record:
    """Split the rendered chat into prompt pieces and assistant turns (the completions).

    Each assistant turn is what the template adds between "conversation so far + generation prompt" and
    "conversation including this turn": the answer and the template's end-of-turn tokens.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:index], where, True)
        after = _apply_template(tokenizer, messages[: index + 1], where, False)
        if not (before.startswith(done) and after.startswith(before)):
            raise UserError(f"{where}: this chat template does not render a conversation as a growing prefix")
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    reference = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return Record(segments, reference.strip(), True, where, question)


def tokenize(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_length: int, train_on_prompt: bool
) -> tuple[Example, bool]:
    """(example, was_truncated). Prompt tokens get IGNORE_INDEX labels unless `train_on_prompt`."""
    input_ids: list[int] = []
    labels: list[int] = []
    first_completion = None
    for index, (text, is_completion) in enumerate(record.segments):
        special = index == 0 and not record.templated  # BOS, for tokenizers that add one
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        if is_completion and first_completion is None:
            first_completion = len(input_ids)
        input_ids += ids
        labels += ids if is_completion or train_on_prompt else [IGNORE_INDEX] * len(ids)
    if not record.templated and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)  # so the model learns to stop
        labels.append(tokenizer.eos_token_id)
    if first_completion is not None and first_completion >= max_length:
        raise UserError(
            f"{record.where}: the prompt is {first_completion} tokens, but --max-length is {max_length}; "
            f"raise --max-length or shorten the prompt"
        )
    truncated = len(input_ids) > max_length
    return Example(input_ids[:max_length], labels[:max_length]), truncated


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most `max_length` tokens (none is split).

    Each example in a row keeps its own positions (0, 1, ... restarting per example) and its first label is
    dropped, as nothing before it in its own example predicts it. From position ids that restart,
    transformers builds attention that is causal within each example only (a block-diagonal mask for SDPA
    and petune's CPU kernel, variable-length sequences for flash attention), so a packed row computes the
    loss and gradients of its examples run one by one (tests/train/test_packing.py).
    """
    rows: list[Example] = []
    for example in examples:
        labels = [IGNORE_INDEX, *example.labels[1:]]
        positions = list(range(len(example.input_ids)))
        row = rows[-1] if rows else None
        if row is not None and row.position_ids is not None and len(row.input_ids) + len(positions) <= max_length:
            row.input_ids += example.input_ids
            row.labels += labels
            row.position_ids += positions
        else:
            rows.append(Example(list(example.input_ids), labels, positions))
    return rows


def pack_batch(examples: Sequence[Example], max_length: int) -> list[Example]:
    """One batch's examples in as few rows of at most `max_length` tokens as first-fit decreasing finds, each
    example attending only to itself (`pack`): the batch's loss and gradients without its padding.

    A batch of variable-length chats padded to its longest computes mostly padding (lengths 41-1042 tokens, median
    87: a batch of 8 pads to ~3x its tokens); these rows hold the same examples and labels, so the step is the
    padded step's to rounding (tests/train/test_packing.py), unlike `--packing`, which fills every row with more
    examples."""
    rows: list[list[Example]] = []
    sizes: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        fits = next((i for i, used in enumerate(sizes) if used + size <= max_length), None)
        if fits is None:
            rows.append([example])
            sizes.append(size)
        else:
            rows[fits].append(example)
            sizes[fits] += size
    return [packed for row in rows for packed in pack(row, max_length)]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels, each (B, T) with T the longest example; for
    packed rows also position_ids, the padding continuing its row's last example (no label reads it)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    position_ids = torch.arange(length).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
        if example.position_ids is not None:
            last = example.position_ids[-1]
            position_ids[row] = torch.tensor([*example.position_ids, *range(last + 1, last + 1 + length - size)])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.position_ids is not None for e in examples):
        batch["position_ids"] = position_ids
    return batch


@dataclass
class Dataset:
    """Tokenised train and held-out examples, plus the held-out records for generation accuracy.
    `--objective dpo`: the examples are `dpo.PreferencePair`s, the records the chosen answers."""

    train: list[Any]  # Example, or dpo.PreferencePair
    val: list[Any]
    val_records: list[Record]
    train_records: int
    truncated: int


def load_records(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> list[Record]:
    return [parse_record(row, where, tokenizer) for where, row in read_rows(path)]


def split_off(items: list[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(kept, held out): a seeded random `val_fraction` of `items` held out (at least one, if any is asked for)."""
    if val_fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, math.ceil(val_fraction * len(items)))])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_dataset(
    tokenizer: PreTrainedTokenizerBase,
    data: str | None,
    val_data: str | None,
    val_fraction: float,
    max_length: int,
    train_on_prompt: bool = False,
    packing: bool = False,
    seed: int = 0,
) -> Dataset:
    """Read, split, tokenise (and optionally pack) the data; `data=None` is the bundled demo set."""
    if data is None:
        data, val_data = str(DEMO_TRAIN), val_data or str(DEMO_VAL)
    records = load_records(data, tokenizer)
    if val_data is not None:
        val_records = load_records(val_data, tokenizer)
    else:
        records, val_records = split_off(records, val_fraction, seed)
    train = [tokenize(r, tokenizer, max_length, train_on_prompt) for r in records]
    val = [tokenize(r, tokenizer, max_length, train_on_prompt)[0] for r in val_records]
    examples = [example for example, _ in train]
    if packing:
        examples = pack(examples, max_length)
    truncated = sum(was_cut for _, was_cut in train)
    return Dataset(examples, val, val_records, len(records), truncated)

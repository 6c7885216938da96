"""`petune generate`, `chat`, `eval` and `merge`: a base model plus (optionally) a trained adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from petune import PeftConfig, PeftModel
from petune.config import read_config_dict
from petune.embedded import load_model_and_tokenizer
from petune.train import UserError
from petune.train.config import read_yaml
from petune.train.data import load_records, parse_prompt, read_rows, tokenize
from petune.train.evaluate import accuracy, generate, heldout_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_folder(path: str) -> Path:
    """An adapter folder, given itself or the run folder holding it (`<run>/adapter`)."""
    folder = Path(path)
    if (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"
    if (folder / "model" / "config.json").is_file():
        raise UserError(f"{path} is a full fine-tuning run, it has no adapter: use --model {folder / 'model'}")
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{path} is not an adapter folder (no adapter_config.json) nor a run folder")
    return folder


def _run_config(adapter: Path) -> dict[str, Any]:
    """The training options of the run an adapter came from, when it sits in a run folder."""
    path = adapter.parent / "config.yaml"
    return read_yaml(path) if path.is_file() else {}


def base_model_of(adapter: Path | None, model: str | None) -> str | None:
    """`--model` if given; else the model the adapter's run used; else its recorded local path; else embedded."""
    if model is not None or adapter is None:
        return model
    run = _run_config(adapter)
    if "model" in run:
        return None if run["model"] is None else str(run["model"])
    recorded = read_config_dict(adapter).get("base_model_name_or_path")
    return recorded if recorded and Path(recorded).is_dir() else None


def load(
    model: str | None, adapter: str | None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The base model (embedded by default), with the adapter loaded on top when one is given."""
    folder = adapter_folder(adapter) if adapter else None
    name = base_model_of(folder, model)
    try:
        base, tokenizer = load_model_and_tokenizer(name, dtype=dtype)
    except OSError as error:
        raise UserError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    if folder is None:
        return base, tokenizer
    return PeftModel.from_pretrained(base, folder), tokenizer


def run_generate(
    model: str | None,
    adapter: str | None,
    prompt: str | None,
    prompts_file: str | None,
    max_new_tokens: int,
    raw: bool,
    out: TextIO,
) -> None:
    """Print the continuation of one prompt, or one JSON line per record of a prompts file."""
    if (prompt is None) == (prompts_file is None):
        raise UserError("give either a prompt or --file PROMPTS.jsonl")
    network, tokenizer = load(model, adapter)
    if prompt is not None:
        templated = not raw and bool(getattr(tokenizer, "chat_template", None))
        text = _as_chat(tokenizer, prompt) if templated else prompt
        print(generate(network, tokenizer, [(text, templated)], max_new_tokens)[0], file=out)
        return
    assert prompts_file is not None
    rows = read_rows(prompts_file)
    prompts = [parse_prompt(row, where, tokenizer) for where, row in rows]
    for (_, row), generation in zip(rows, generate(network, tokenizer, prompts, max_new_tokens), strict=True):
        print(json.dumps({**row, "generation": generation}), file=out)


def _as_chat(tokenizer: PreTrainedTokenizerBase, text: str, history: list[dict[str, str]] | None = None) -> str:
    messages = [*(history or []), {"role": "user", "content": text}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def run_chat(
    model: str | None, adapter: str | None, max_new_tokens: int, system: str | None, stdin: TextIO, out: TextIO
) -> None:
    """A conversation on stdin/stdout with the chat template; `/reset` forgets it, `/exit` or EOF ends it."""
    network, tokenizer = load(model, adapter)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template; use `petune generate` instead")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    if interactive:
        print("chat with the model; /reset starts over, /exit (or Ctrl-D) ends", file=out)
    while True:
        if interactive:
            print("you> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        reply = generate(network, tokenizer, [(_as_chat(tokenizer, line.strip(), history), True)], max_new_tokens)[0]
        history += [{"role": "user", "content": line.strip()}, {"role": "assistant", "content": reply}]
        print(f"assistant> {reply}", file=out, flush=True)


def run_eval(
    model: str | None, adapter: str | None, data: str, max_length: int, batch_size: int, samples: int | None
) -> dict[str, Any]:
    """Loss and perplexity over the completions of `data`, and exact-match / contains accuracy."""
    network, tokenizer = load(model, adapter)
    records = load_records(data, tokenizer)
    examples = [tokenize(r, tokenizer, max_length, train_on_prompt=False)[0] for r in records]
    device = next(network.parameters()).device
    result: dict[str, Any] = {"data": data, "records": len(records)}
    result.update(heldout_loss(network, examples, tokenizer.pad_token_id, batch_size, device))
    scored = accuracy(network, tokenizer, records[:samples] if samples else records, batch_size)
    result.update({k: scored[k] for k in ("exact_match", "contains", "count")})
    return result


def merged_model(
    model: str | None, adapter: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base with a weight adapter (LoRA and its kin) folded in, as a plain transformers model."""
    folder = adapter_folder(adapter)
    config = PeftConfig.from_pretrained(folder)
    if config.is_prompt_learning:
        raise UserError(
            f"{folder} is a {config.peft_type} adapter: it adds virtual tokens, there are no weights to merge"
        )
    if _run_config(folder).get("method") == "qlora":
        print("the adapter was trained on a 4-bit base: merging into the dequantised float weights", file=sys.stderr)
    network, tokenizer = load(model, str(folder), dtype)
    assert isinstance(network, PeftModel)
    base = network.get_base_model()
    if getattr(getattr(base.config, "quantization_config", None), "load_in_4bit", False):
        print("the base model is 4-bit: dequantising it before merging", file=sys.stderr)
        base.dequantize()  # type: ignore[operator]
    merged = network.merge_and_unload()
    assert isinstance(merged, PreTrainedModel)
    return merged, tokenizer


def run_merge(model: str | None, adapter: str, output: str, dtype: str, overwrite: bool) -> Path:
    """Fold a LoRA-family adapter into the base weights and save a plain transformers folder.

    The folder is written under a temporary name and renamed into place: `output` is never half-written.
    """
    from petune.export.output import atomic_output, check_free

    target = Path(output)
    check_free(target, overwrite)
    merged, tokenizer = merged_model(model, adapter, DTYPES[dtype])
    with atomic_output(target, overwrite, folder=True) as folder:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return target

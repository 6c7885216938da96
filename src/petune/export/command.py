"""`petune export`: what was trained, as files llama.cpp, Ollama and transformers run.

Formats: `gguf` (the base, with the adapter merged when one is given), `gguf-lora` (the adapter alone, for
llama.cpp's `--lora` and Ollama's ADAPTER) and `hf` (the merged transformers folder `petune merge` writes).
Beside a GGUF export goes an Ollama Modelfile (`<output stem>.Modelfile`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TextIO

from petune.export.output import atomic_output, check_free, write_text
from petune.export.outtypes import OUTTYPES, outtype_named
from petune.train import UserError

FORMATS = ("gguf", "gguf-lora", "hf")
LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # 4-bit factors would lose most of a small update
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter", help="adapter folder, or a run folder holding adapter/ (default: none, the base alone)"
    )
    parser.add_argument(
        "--model",
        help="base model: HF folder, .gguf file or hub id "
        "(default: the model of the adapter's run, else the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="gguf: one file, adapter merged (llama.cpp, Ollama, LM Studio); gguf-lora: the LoRA alone, "
        "used with a base GGUF (`llama-cli -m base.gguf --lora FILE`); hf: merged transformers folder",
    )
    costs = "; ".join(f"{name}: {outtype.cost}" for name, outtype in OUTTYPES.items())
    parser.add_argument(
        "--outtype",
        default="f16",
        metavar="TYPE",
        help=f"weight type: {', '.join(OUTTYPES)} (default: f16). The demo model in llama.cpp "
        f"(SmolLM2-135M + demo LoRA; exact match on 20 held-out records, BENCHMARKS.md): {costs}. "
        f"gguf-lora takes {', '.join(LORA_OUTTYPES)}; hf takes {', '.join(HF_DTYPES)}",
    )
    parser.add_argument("--output", required=True, help="file (gguf, gguf-lora) or folder (hf) to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: refuse)")


def run(args: argparse.Namespace, out: TextIO) -> int:
    output = Path(args.output)
    if args.format == "hf":
        return _export_hf(args, output, out)
    if args.format == "gguf-lora":
        outtype = outtype_named(args.outtype, LORA_OUTTYPES)
        if args.adapter is None:
            raise UserError("--format gguf-lora needs --adapter (the LoRA to export)")
        check_free(output, args.overwrite)
        pairs = _export_lora(args, outtype, output)
        print(f"LoRA adapter ({pairs} matrices) written to {output}", file=out)
    else:
        outtype = outtype_named(args.outtype)
        check_free(output, args.overwrite)
        _export_model(args, outtype, output)
        print(f"model written to {output}", file=out)
    print(f"Ollama: ollama create NAME -f {_modelfile_path(output)}", file=out)
    return 0


def _export_hf(args: argparse.Namespace, output: Path, out: TextIO) -> int:
    from petune.train.commands import run_merge

    if args.outtype not in HF_DTYPES:
        raise UserError(f"unknown --outtype {args.outtype!r} for --format hf; choose one of {', '.join(HF_DTYPES)}")
    if args.adapter is None:
        raise UserError("--format hf needs --adapter (the base model is already a transformers folder)")
    run_merge(args.model, args.adapter, str(output), HF_DTYPES[args.outtype], args.overwrite)
    print(f"merged model written to {output}", file=out)
    return 0


def _export_model(args: argparse.Namespace, outtype: Any, output: Path) -> None:
    from petune.embedded import load_model_and_tokenizer
    from petune.export.architectures import architecture_of
    from petune.export.gguf_model import write_model_gguf
    from petune.export.modelfile import modelfile_text
    from petune.train.commands import base_model_of, merged_model

    architecture_of(_base_config(args))  # refuse an unmapped architecture before loading any weights
    if args.adapter is not None:
        _refuse_prompt_learning(args.adapter)
        model, tokenizer = merged_model(args.model, args.adapter)
    else:
        model, tokenizer = load_model_and_tokenizer(base_model_of(None, args.model))
    name = Path(args.adapter).name if args.adapter else str(getattr(model.config, "_name_or_path", "") or "model")
    with atomic_output(output, args.overwrite) as temporary:
        write_model_gguf(model, tokenizer, outtype, temporary, name)
    write_text(_modelfile_path(output), modelfile_text(f"./{output.name}", tokenizer), args.overwrite)


def _export_lora(args: argparse.Namespace, outtype: Any, output: Path) -> int:
    from transformers import AutoTokenizer

    from petune.config import PeftConfig
    from petune.embedded import resolve_model_path
    from petune.export.gguf_lora import check_lora_exportable, write_lora_gguf
    from petune.export.modelfile import modelfile_text
    from petune.train.commands import adapter_folder

    folder = adapter_folder(args.adapter)
    _refuse_prompt_learning(args.adapter)
    config = PeftConfig.from_pretrained(folder)
    check_lora_exportable(config)
    with atomic_output(output, args.overwrite) as temporary:
        pairs = write_lora_gguf(folder, config, _base_config(args), outtype, temporary)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(_base_name(args)))
    text = modelfile_text("./base.gguf", tokenizer, adapter_file=f"./{output.name}")
    write_text(_modelfile_path(output), text, args.overwrite)
    return pairs


def _base_name(args: argparse.Namespace) -> str | None:
    from petune.train.commands import adapter_folder, base_model_of

    return base_model_of(adapter_folder(args.adapter) if args.adapter else None, args.model)


def _base_config(args: argparse.Namespace) -> Any:
    from transformers import AutoConfig

    from petune.embedded import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(_base_name(args)))


def _refuse_prompt_learning(adapter: str) -> None:
    from petune.config import PeftConfig
    from petune.train.commands import adapter_folder

    config = PeftConfig.from_pretrained(adapter_folder(adapter))
    if config.is_prompt_learning:
        raise UserError(
            f"a {config.peft_type} adapter adds virtual tokens, which llama.cpp has no place for, and has no "
            "weights to merge: export the base alone (leave out --adapter) and serve the adapter with "
            "`petune chat`, or train a LoRA (`petune train --method lora`) to deploy in llama.cpp"
        )


def _modelfile_path(output: Path) -> Path:
    return output.with_name(output.stem + ".Modelfile")

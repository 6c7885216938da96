"""The `petune` command: train, generate, chat, eval, merge, export, plan, compare. Parsing only; the work is in
`petune.train`, `petune.plan` and `petune.compare`.

A mistake in the user's input (a file, a field, an option) ends with a one-line message on stderr and
exit status 2, never a traceback; set PETUNE_DEBUG=1 to see the traceback anyway.

The console script is `entry`: it runs `main` on mimalloc (`petune.memory`), starting itself again once to
get it; PETUNE_ALLOCATOR=system keeps the system allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from petune.train import UserError
from petune.train.config import option_table

LAUNCHED = "PETUNE_LAUNCHED"  # set in processes started by `--nproc`, which must not launch again
RESTARTED = "PETUNE_RESTARTED"  # set when `entry` started the command again on mimalloc, which must not again
EXPECTED_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, ValueError, OSError)


def entry() -> int:
    """The `petune` console script: `main`, in a process on mimalloc where it is installed.

    The allocator of a running process cannot change, so this process is replaced by the same command with
    mimalloc preloaded (before torch is imported; `import petune` is lazy). Peak RSS of a LoRA step on the
    embedded model: 2769 MB on glibc, 1747 MB on mimalloc, at the same speed (petune.memory, BENCHMARKS.md).
    """
    from petune.memory import allocator_environment, running_allocator

    if RESTARTED not in os.environ and running_allocator() != "mimalloc":
        try:
            environment = allocator_environment(os.environ)
        except ValueError as error:
            print(f"petune: error: {error}", file=sys.stderr)
            return 2
        if environment is not None:
            sys.stdout.flush()
            os.execve(
                sys.executable, [sys.executable, "-m", "petune.cli", *sys.argv[1:]], {**environment, RESTARTED: "1"}
            )
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args, argv) or 0)
    except KeyboardInterrupt:
        return 130
    except EXPECTED_ERRORS as error:
        if os.environ.get("PETUNE_DEBUG"):
            raise
        print(f"petune {args.command}: error: {error}", file=sys.stderr)
        return 2


def _quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and advice; petune prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    from petune import __version__
    from petune.memory import running_allocator

    parser = argparse.ArgumentParser(prog="petune", description="Parameter-efficient fine-tuning, HF PEFT format.")
    parser.add_argument(
        "--version", action="version", version=f"petune {__version__} (host allocator: {running_allocator()})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(commands)
    _add_generate(commands)
    _add_chat(commands)
    _add_eval(commands)
    _add_merge(commands)
    _add_export(commands)
    _add_plan(commands)
    _add_compare(commands)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    parser.add_argument(
        "--model",
        help="base model: HF folder, .gguf file or hub id "
        "(default: the model of the adapter's run, else the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--adapter",
        required=adapter_required,
        help="adapter folder, or a run folder holding adapter/" + ("" if adapter_required else " (default: none)"),
    )


# --- train ------------------------------------------------------------------------------------------


def _add_train(commands: Any) -> None:
    parser = commands.add_parser(
        "train",
        help="train an adapter (no arguments: the demo on the embedded model)",
        description="Train an adapter. Options come from the defaults (the demo run), then --config FILE "
        "(YAML, e.g. `lora: {r: 16}`), then flags (`--lora.r 16`). Booleans take true/false.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (flags override it)")
    groups: dict[str, Any] = {}
    for name, hint, default, text in option_table():
        section = name.partition(".")[0] if "." in name else ""
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options" if section else "options")
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        metavar = "BOOL" if hint is bool else name.rpartition(".")[2].upper()
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if hint is bool else {}
        shown = ",".join(default) if isinstance(default, list) else default
        text = text if "default:" in text else f"{text} (default: {shown})"
        groups[section].add_argument(*flags, dest=name, metavar=metavar, help=text, **extra)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from petune.train.config import build_config, flatten, read_yaml
    from petune.train.report import default_output

    names = {name for name, *_ in option_table()}
    flags = {key: value for key, value in vars(args).items() if key in names}
    layers: list[dict[str, Any]] = []
    if str(flags.get("resume", "false")).lower() in ("true", "1", "yes") and "output" in flags:
        saved = Path(flags["output"]) / "config.yaml"
        if saved.is_file():  # continue with the run's own options; --config and flags still win
            layers.append({k: v for k, v in flatten(read_yaml(saved)).items() if k not in ("resume", "overwrite")})
    if getattr(args, "config", None):
        layers.append(read_yaml(args.config))
    cfg = build_config(*layers, flags)
    if cfg.output is None:
        cfg.output = default_output(cfg.method)
    world = os.environ.get("WORLD_SIZE")  # set by torchrun and accelerate launch
    # an engine (--strategy) runs in a launched process group, even a group of one
    needs_group = (cfg.nproc > 1 and int(world or "1") == 1) or (cfg.strategy != "ddp" and not world)
    if LAUNCHED not in os.environ and needs_group:
        return _relaunch(cfg.nproc, [*_without_nproc(argv), "--output", cfg.output])
    from petune.train.loop import train

    train(cfg)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """`argv` less `--nproc N`: the launched processes learn their number from the launcher."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--nproc",):
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Run this same command in `nproc` data-parallel processes on this machine; return the worst exit code.

    The processes get the environment torchrun and `accelerate launch --multi_gpu` give (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT...), from which each `Accelerator()` joins the group (gloo on CPU). Launching them here
    rather than through those launchers keeps a user's mistake to one line instead of a launcher's report.
    When one process fails, the others are stopped.
    """
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    common = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "petune.cli", *argv],
            preexec_fn=_die_with_parent,
            env={
                **os.environ,
                **common,
                LAUNCHED: "1",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "OMP_NUM_THREADS": threads,
            },
        )
        for rank in range(nproc)
    ]
    try:
        while any(p.poll() is None for p in processes):
            if any(p.returncode not in (None, 0) for p in processes):
                for other in processes:
                    if other.poll() is None:
                        other.terminate()
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return max((p.returncode for p in processes if p.returncode and p.returncode > 0), default=0) or max(
        (abs(p.returncode) for p in processes), default=0
    )


def _die_with_parent() -> None:
    """In a launched process (Linux): be killed when the launching `petune` dies, even by SIGKILL, so that no
    orphan keeps training into the run folder that a resumed run then uses."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- generate, chat, eval, merge ----------------------------------------------------------------------


def _add_generate(commands: Any) -> None:
    parser = commands.add_parser("generate", help="generate from one prompt or a JSONL of prompts")
    parser.add_argument("prompt", nargs="?", help="the prompt (default: none; or use --file)")
    parser.add_argument(
        "--file",
        metavar="PROMPTS",
        help="JSONL/JSON/CSV of {prompt}, {instruction, input} or {messages} records (default: none)",
    )
    _add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="use PROMPT as plain text, without the chat template (default: chat template when the tokenizer has one)",
    )
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout (default: stdout)")
    parser.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace, argv: list[str]) -> int:
    from petune.train.commands import run_generate

    if args.output:
        with open(args.output, "w") as out:
            run_generate(args.model, args.adapter, args.prompt, args.file, args.max_new_tokens, args.raw, out)
    else:
        run_generate(args.model, args.adapter, args.prompt, args.file, args.max_new_tokens, args.raw, sys.stdout)
    return 0


def _add_chat(commands: Any) -> None:
    parser = commands.add_parser("chat", help="talk to the model (stdin/stdout, chat template)")
    _add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    parser.add_argument("--system", help="system message (default: the template's own)")
    parser.set_defaults(handler=_chat)


def _chat(args: argparse.Namespace, argv: list[str]) -> int:
    from petune.train.commands import run_chat

    run_chat(args.model, args.adapter, args.max_new_tokens, args.system, sys.stdin, sys.stdout)
    return 0


def _add_eval(commands: Any) -> None:
    parser = commands.add_parser("eval", help="loss, perplexity and accuracy on a data file")
    parser.add_argument("--data", required=True, help="records with answers (same formats as train)")
    _add_model_options(parser)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example (default: 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per batch (default: 8)")
    parser.add_argument(
        "--samples", type=int, default=None, help="score only the first N records by generation (default: all)"
    )
    parser.add_argument("--output", metavar="FILE", help="also write the results as JSON to FILE (default: none)")
    parser.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace, argv: list[str]) -> int:
    from petune.train.commands import run_eval

    result = run_eval(args.model, args.adapter, args.data, args.max_length, args.batch_size, args.samples)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


def _add_merge(commands: Any) -> None:
    parser = commands.add_parser("merge", help="fold a LoRA adapter into the base: a plain transformers folder")
    _add_model_options(parser, adapter_required=True)
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: refuse)")
    parser.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace, argv: list[str]) -> int:
    from petune.train.commands import run_merge

    target = run_merge(args.model, args.adapter, args.output, args.dtype, args.overwrite)
    print(f"merged model written to {target} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _add_export(commands: Any) -> None:
    _add_command_module(
        commands,
        "export",
        "petune.export.command",
        help="GGUF for llama.cpp / Ollama (merged model or LoRA adapter), or a merged transformers folder",
        description="Export a model, with its adapter merged or alongside, for llama.cpp, Ollama and other "
        "GGUF runtimes; an Ollama Modelfile is written beside a GGUF export.",
    )


# --- plan, compare ----------------------------------------------------------------------------------


def _add_plan(commands: Any) -> None:
    _add_command_module(
        commands,
        "plan",
        "petune.plan.command",
        help="memory by component, fit and FLOPs of a fine-tuning step, per method",
        description="Predict one training step's memory (weights, gradients, optimizer state, activations, "
        "loss, overhead) for full fine-tuning and PEFT methods, whether it fits a device, and the largest "
        "batch and sequence that do.",
    )


def _add_compare(commands: Any) -> None:
    _add_command_module(
        commands,
        "compare",
        "petune.compare.command",
        help="train several methods on the same data and budget; table and charts",
        description="Run `petune train` for each method with the same model, data and steps, one after another, "
        "and write compare.json, compare.md and compare.png (held-out loss and accuracy, trainable parameters, "
        "peak memory, wall time, adapter size).",
    )


def _add_command_module(commands: Any, name: str, module: str, help: str, description: str) -> None:
    """A command whose options (`add_arguments(parser)`) and work (`run(args, out)`) live in `module`."""
    import importlib

    command = importlib.import_module(module)
    parser = commands.add_parser(name, help=help, description=description)
    command.add_arguments(parser)
    parser.set_defaults(handler=lambda args, argv: command.run(args, sys.stdout))


if __name__ == "__main__":
    sys.exit(entry())

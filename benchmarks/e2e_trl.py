"""End-to-end training throughput: `petune train` vs TRL's `SFTTrainer` + HF PEFT, same data and settings.

Each side runs in a fresh process (benchmarks/e2e_sides.py), so imports, model load and peak memory are
its own; with `--repeats N` the sides alternate, TRL first, and the section shows the median of each number.

Both sides train the embedded SmolLM2-135M-Instruct with LoRA (r 8, alpha 16, dropout 0, q_proj and v_proj) on
the same records in the same order (petune's shuffled stream of the training file, handed to TRL as a list that
its trainer reads sequentially), with the same optimizer settings (torch's fused AdamW, lr 2e-3, 3 warmup
steps then cosine, no weight decay, gradient norm clipped to 1), batch 8, max length 512, no packing, loss on
the completion tokens only, fp32 (`--precision bf16` for both), no gradient checkpointing, no evaluation or checkpoints.
petune runs its own training loop (`petune.train.loop.setup` + `train_steps`, what `petune train` calls);
TRL gets the chat records as conversational prompt-completion pairs, so its `completion_only_loss` masks
the same prompt tokens that petune masks (the section warns when the two count different tokens).

    tokens/s  = non-padding tokens of the batches trained on (prompt + completion; the attention mask's sum)
                / wall time of the training loop, first step to last: batching, forward, backward, clipping,
                optimizer, logging. Not counted: imports, model load, tokenisation, adapter injection, saving.
    peak RSS  = VmHWM of the process when it ends (imports and the model included), `petune.plan.measure.peak_mb`.

    python benchmarks/e2e_trl.py                        # both sides; writes its section of BENCHMARKS.md
    python benchmarks/e2e_trl.py --steps 10 --repeats 3 --out /tmp/b.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from e2e_sides import RESULT_PREFIX, SIDES, Settings, data_path, petune_order
from sections import stamped, write_section

from petune.memory import allocator_environment

HERE = Path(__file__).resolve().parent
SECTION = "## End-to-end: `petune train` vs TRL `SFTTrainer` + peft"
PACKED_SECTION = "## End-to-end, variable-length chats: `petune train --packing` vs TRL `SFTTrainer` + peft"
TARGET_RATIO = 1.25  # issue 5: end-to-end tokens/s >= 1.25 x TRL + peft
VARIABLE_SECTION = "## End-to-end, variable-length chats: `petune train` (padding-free) vs TRL `SFTTrainer` + peft"
PACKED_TARGET_RATIO = 2.5  # issue 20: petune packed >= 2.5 x TRL + peft on variable-length data
PACKED = (
    "petune packs records into max-length rows (each attending only to itself; the same number of rows per step "
    "as TRL has records, so it trains on more records), TRL does not pack (its default)"
)
PADDING_FREE = (
    "petune puts each step's records into as few max-length rows as fit, each attending only to itself (its "
    "default, padding-free: the same records a step as TRL), TRL pads each batch to its longest record (its default)"
)


def trl_record(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A record in TRL's prompt-completion format, with the same loss mask petune gives it."""
    if "prompt" in row and "completion" in row:  # text: both sides append EOS to the completion
        return {"prompt": str(row["prompt"]), "completion": str(row["completion"])}
    messages = row.get("messages")
    roles = [m.get("role") for m in messages] if isinstance(messages, list) else []
    if roles and roles.count("assistant") == 1 and roles[-1] == "assistant":  # petune trains every assistant turn
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    raise ValueError(f"{where}: the TRL side takes prompt/completion records or chats ending in one assistant turn")


def trl_records(settings: Settings) -> list[dict[str, Any]]:
    from petune.train.data import read_rows

    rows = read_rows(data_path(settings))
    return [trl_record(rows[i][1], rows[i][0]) for i in petune_order(settings)]


def environment(allocator: str) -> dict[str, str]:
    """This process's environment for a child on `allocator`: "system", or "mimalloc" (where it is installed;
    the system's otherwise). Shared with run.py."""
    system = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if allocator == "system":
        return {**system, "PETUNE_ALLOCATOR": "system"}
    return allocator_environment({**system, "PETUNE_ALLOCATOR": "mimalloc"}) or system


def measure(side: str, settings: Settings, records_file: str, model_dir: str) -> dict[str, Any]:
    """Run one side in a fresh process; its result, or {"error": last line of its stderr}."""
    command = [sys.executable, str(HERE / "e2e_sides.py"), side, "--settings", json.dumps(dataclasses.asdict(settings))]
    command += ["--records", records_file, "--model-dir", model_dir]
    # petune's side runs on the allocator the `petune` command runs on, TRL's on the system's, as each is started
    env = {**environment("mimalloc" if side == "petune" else "system"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}, no output"]
        return {"side": side, "error": tail[0]}
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each number over the runs that worked (the first run's other fields)."""
    good = [run for run in runs if "error" not in run]
    if not good:
        return runs[0]
    merged = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, int | float):
            merged[key] = statistics.median(run[key] for run in good)
    merged["all_tokens_per_s"] = [run["tokens_per_s"] for run in good]
    return merged


def compare(settings: Settings, repeats: int, sides: tuple[str, ...] = SIDES) -> dict[str, dict[str, Any]]:
    """{side: median result}; the sides alternate, in the order of `sides`, each run a fresh process."""
    from petune.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir())  # what petune's side loads when no --model is given
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="e2e-records-", delete=False) as handle:
        json.dump(trl_records(settings), handle)
    try:
        for _ in range(repeats):
            for side in sides:
                runs[side].append(measure(side, settings, handle.name, model_dir))
                print(side, {k: v for k, v in runs[side][-1].items() if k != "losses"}, flush=True)
    finally:
        os.unlink(handle.name)
    return {side: median_result(results) for side, results in runs.items()}


# --- the BENCHMARKS.md section -------------------------------------------------------------------------


def row(label: str, ours: dict[str, Any], theirs: dict[str, Any], key: str, fmt: str, with_ratio: bool) -> str:
    cells = [format(r[key], fmt) if key in r else f"failed: {r.get('error', '?')[:60]}" for r in (ours, theirs)]
    ratio = f"{ours[key] / theirs[key]:.2f}" if with_ratio and key in ours and key in theirs else ""
    return f"| {label} | {cells[0]} | {cells[1]} | {ratio} |"


def losses(result: dict[str, Any]) -> str:
    values = result.get("losses") or []
    return f"{values[0]:.3f} → {values[-1]:.3f}" if values else "—"


def section(settings: Settings) -> str:
    """The BENCHMARKS.md section of a run: demo data, or variable-length chats packed or padding-free."""
    if settings.packing:
        return PACKED_SECTION
    return VARIABLE_SECTION if settings.data is not None and settings.padding_free else SECTION


def verdict(ours: dict[str, Any], theirs: dict[str, Any], settings: Settings) -> str:
    """The issue's target, met or not, and whether both sides trained on the same tokens."""
    if "tokens_per_s" not in ours or "tokens_per_s" not in theirs:
        return "Target not measured: a side failed (its last error line is in the table)."
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    issue, target = ("5", TARGET_RATIO) if section(settings) == SECTION else ("20", PACKED_TARGET_RATIO)
    met = "reached" if ratio >= target else f"not reached, by {target - ratio:.2f}"
    text = f"Target (issue {issue}): tokens/s >= {target}x TRL + peft; measured {ratio:.2f}x, {met}."
    same = ours.get("packing") or all(ours[key] == theirs[key] for key in ("tokens", "labelled_tokens"))
    return text + ("" if same else " WARNING: the two sides did not train on the same number of tokens.")


def render(results: dict[str, dict[str, Any]], settings: Settings, command: str, repeats: int, note: str) -> str:
    ours, theirs = results["petune"], results["trl"]
    versions = ", ".join(f"{name} {theirs.get(name) or ours.get(name, '?')}" for name in VERSIONED)
    median = f"median of {repeats} alternating runs per side" if repeats > 1 else "one run per side"
    packing = PACKED if settings.packing else PADDING_FREE if settings.padding_free else "no packing"
    lines = [
        section(settings),
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores, device "
        f"{ours.get('device', theirs.get('device', '?'))}; {versions}. Embedded SmolLM2-135M-Instruct, LoRA r "
        f"{settings.lora_r}, alpha {settings.lora_alpha:g}, dropout {settings.lora_dropout:g}, "
        f"{'+'.join(settings.target_modules)}; {settings.steps} steps x batch {settings.batch_size} records of "
        f"{'the demo training set' if settings.data is None else settings.data} in the same order, max length "
        f"{settings.max_length}, {packing}, loss on completions only, {settings.precision}; torch's fused AdamW lr "
        f"{settings.lr:g}, {settings.warmup_steps} warmup steps then {settings.schedule}, clip "
        f"{settings.max_grad_norm:g}; {median}, each a fresh process. tokens/s = non-padding tokens (prompt + "
        "completion) / wall time of the training loop (first step to last; model load, tokenisation and adapter "
        "injection not counted). Peak RSS = VmHWM of the whole process (imports and model included).",
        "",
        f"Command: `{command}`" + (f" ({note})" if note else ""),
        "",
        "| | petune train | TRL SFTTrainer + peft | petune / TRL |",
        "|---|---|---|---|",
        row("tokens/s", ours, theirs, "tokens_per_s", ".0f", True),
        row("training loop s", ours, theirs, "loop_s", ".1f", True),
        row("training loop CPU s (all threads)", ours, theirs, "loop_cpu_s", ".1f", True),
        row("non-padding tokens", ours, theirs, "tokens", ".0f", False),
        row("completion tokens (with loss)", ours, theirs, "labelled_tokens", ".0f", False),
        f"| loss, first → last step | {losses(ours)} | {losses(theirs)} | |",
        row("peak RSS MB", ours, theirs, "peak_rss_mb", ".0f", True),
        row("RSS when the loop starts MB", ours, theirs, "loop_start_rss_mb", ".0f", True),
        f"| host allocator | {ours.get('allocator', '?')} | {theirs.get('allocator', '?')} | |",
    ]
    if "peak_gpu_mb" in ours or "peak_gpu_mb" in theirs:
        lines.append(row("peak GPU memory MB", ours, theirs, "peak_gpu_mb", ".0f", True))
    if repeats > 1:
        each = {side: ", ".join(f"{v:.0f}" for v in results[side].get("all_tokens_per_s", [])) for side in SIDES}
        lines += ["", f"tokens/s of each run: petune {each['petune']}; TRL {each['trl']}."]
    notes = NOTES + (BF16_NOTE if settings.precision == "bf16" else [])
    return "\n".join([*lines, "", verdict(ours, theirs, settings), "", *notes]) + "\n"


VERSIONED = ("petune", "peft", "trl", "transformers", "torch")
NOTES = [
    "Differences left between the two setups:",
    "",
    "- Learning-rate warmup: transformers' schedule gives step 1 a learning rate of 0, petune's gives it",
    "  lr / (warmup + 1); the cosine decay to 0 after warmup is the same. Throughput does not depend on it.",
    "- TRL's loop also computes each token's entropy and top-1 match for its logs (its default, from the same",
    "  chunked LM head that gives the loss; neither side builds the full logits).",
    "- The host allocator: petune's process runs on mimalloc, as the `petune` command does (`petune.memory`);",
    "  TRL's on the system's (glibc), as `python train.py` does.",
    "- TRL's process imports datasets, pandas and pyarrow, which petune does not need: compare the RSS when the",
    "  loop starts to see what the loop itself adds on each side.",
]
BF16_NOTE = [
    "- bf16: petune loads the frozen base in bf16 and autocasts; TRL (`bf16=True`) autocasts the fp32 model it",
    "  was given, so its weights stay fp32.",
]


def command_line(script: str, argv: list[str]) -> str:
    """`python <script> <argv>` as typed in a shell, less `--note` (the section shows the note after it)."""
    kept: list[str] = []
    for index, arg in enumerate(argv):
        dropped = arg == "--note" or arg.startswith("--note=") or (index > 0 and argv[index - 1] == "--note")
        kept += [] if dropped else [arg]
    return shlex.join(["python", script, *kept])


def run_section(settings: Settings, repeats: int, out: Path, command: str, note: str = "") -> str:
    """Measure both sides, write the section into `out` and return it."""
    text = render(compare(settings, repeats), settings, command, repeats, note)
    write_section(out, section(settings), text)
    print(f"wrote the end-to-end section of {out}")
    return text


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The options a user sets (also offered by benchmarks/run.py, there with `prefix` "e2e-")."""
    parser.add_argument(f"--{prefix}steps", type=int, default=Settings.steps, help="optimizer steps per side")
    parser.add_argument(f"--{prefix}repeats", type=int, default=1, help="runs per side, alternating; the median")
    parser.add_argument(f"--{prefix}precision", choices=["fp32", "bf16"], default=Settings.precision)
    parser.add_argument(f"--{prefix}data", help="training file (default: petune's demo set)")
    parser.add_argument(f"--{prefix}max-length", type=int, default=Settings.max_length, help="tokens per row")
    parser.add_argument(f"--{prefix}packing", action="store_true", help="petune packs (benchmarks/chat_lengths.py)")
    parser.add_argument(
        f"--{prefix}padded", dest=f"{prefix.replace('-', '_')}padding_free", action="store_false",
        help="petune pads each batch as TRL does (its --padding-free false)",
    )  # fmt: skip


def settings_from(args: argparse.Namespace, prefix: str = "") -> Settings:
    names = ("steps", "precision", "data", "max_length", "packing", "padding_free")
    values = {name: getattr(args, f"{prefix}{name}") for name in names}
    return Settings(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    parser.add_argument("--note", default="", help="said after the command in the section (e.g. the machine's load)")
    args = parser.parse_args()
    command = command_line("benchmarks/e2e_trl.py", sys.argv[1:])
    note = stamped(args.note)
    run_section(settings_from(args), args.repeats, args.out, command, note)


if __name__ == "__main__":
    main()

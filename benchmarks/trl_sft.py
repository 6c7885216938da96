"""TRL's `SFTTrainer` training a petune LoRA vs the same trainer training a peft LoRA: the drop-in, measured.

Both sides are `run_trl` of benchmarks/e2e_sides.py, the TRL side of the end-to-end comparison (its docstring
says the settings: embedded SmolLM2-135M-Instruct, LoRA r 8 on q_proj+v_proj, the demo records in the same
order, completion-only loss, no packing, fp32, torch's fused AdamW), differing only in the adapter: peft's
`peft_config=LoraConfig(...)`, or a model wrapped by petune's `get_peft_model` with the same config. Each run
is a fresh process on the system allocator; with `--repeats N` the sides alternate, peft first, and the
section shows the medians.

    tokens/s = non-padding tokens of the batches trained on / wall time of TRL's training loop.
    peak RSS = VmHWM of the process when it ends (imports and the model included).

    python benchmarks/trl_sft.py --steps 10 --repeats 3     # writes its section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from e2e_sides import TRL_PETUNE, Settings
from e2e_trl import add_arguments, command_line, compare, losses, settings_from
from sections import stamped, write_section

HERE = Path(__file__).resolve().parent
SECTION = "## TRL SFTTrainer: petune vs peft as the adapter library"
SIDES = ("trl", TRL_PETUNE)  # peft first


def row(label: str, ours: dict[str, Any], theirs: dict[str, Any], key: str, fmt: str) -> str:
    cells = [format(r[key], fmt) if key in r else f"failed: {r.get('error', '?')[:60]}" for r in (ours, theirs)]
    ratio = f"{ours[key] / theirs[key]:.2f}" if key in ours and key in theirs else ""
    return f"| {label} | {cells[0]} | {cells[1]} | {ratio} |"


def render(results: dict[str, dict[str, Any]], settings: Settings, command: str, repeats: int, note: str) -> str:
    ours, theirs = results[TRL_PETUNE], results["trl"]
    versions = ", ".join(f"{name} {ours.get(name, '?')}" for name in ("petune", "peft", "trl", "transformers", "torch"))
    median = f"median of {repeats} alternating runs per side" if repeats > 1 else "one run per side"
    each = {side: ", ".join(f"{v:.1f}" for v in results[side].get("all_tokens_per_s", [])) for side in SIDES}
    return "\n".join(
        [
            SECTION,
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores, device "
            f"{ours.get('device', '?')}; {versions}. TRL's SFTTrainer, the same settings and records on both sides "
            f"(benchmarks/e2e_sides.py `run_trl`): {settings.steps} steps x batch {settings.batch_size}, max length "
            f"{settings.max_length}, {settings.precision}, LoRA r {settings.lora_r} on "
            f"{'+'.join(settings.target_modules)}; {median}, each a fresh process on the system allocator.",
            "",
            f"Command: `{command}`" + (f" ({note})" if note else ""),
            "",
            "| | SFTTrainer + petune | SFTTrainer + peft | petune / peft |",
            "|---|---|---|---|",
            row("tokens/s", ours, theirs, "tokens_per_s", ".1f"),
            row("training loop s", ours, theirs, "loop_s", ".1f"),
            row("training loop CPU s (all threads; less sensitive to other load)", ours, theirs, "loop_cpu_s", ".1f"),
            row("non-padding tokens", ours, theirs, "tokens", ".0f"),
            f"| loss, first → last step | {losses(ours)} | {losses(theirs)} | |",
            row("peak RSS MB", ours, theirs, "peak_rss_mb", ".0f"),
            row("RSS when the loop starts MB", ours, theirs, "loop_start_rss_mb", ".0f"),
            "",
            f"tokens/s of each run: petune {each[TRL_PETUNE]}; peft {each['trl']}.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    parser.add_argument("--note", default="", help="said after the command in the section (e.g. the machine's load)")
    args = parser.parse_args()
    settings = settings_from(args)
    command = command_line("benchmarks/trl_sft.py", sys.argv[1:])
    note = stamped(args.note)
    text = render(compare(settings, args.repeats, SIDES), settings, command, args.repeats, note)
    write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()

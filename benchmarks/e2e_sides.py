"""One side of the end-to-end comparison (benchmarks/e2e_trl.py), run in this process.

    python benchmarks/e2e_sides.py petune --settings '{"steps": 4}'
    python benchmarks/e2e_sides.py trl --settings '{"steps": 4}' --records R.json --model-dir DIR

Prints one line, `E2E_RESULT {json}`: the tokens trained on, the training loop's wall and CPU seconds,
tokens/s, the loss of each step, peak RSS (VmHWM, `petune.plan.measure.peak_mb`) and the RSS when the
loop started, and the versions. e2e_trl.py starts a fresh process of this file per measurement and writes
the records TRL reads (petune's order) and passes the model folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_PREFIX = "E2E_RESULT "  # TRL prints its logs as Python dicts on stdout; our line is told apart by this
SIDES = ("trl", "petune")
TRL_PETUNE = "trl-petune"  # TRL's SFTTrainer training petune's LoRA instead of peft's (benchmarks/trl_sft.py)


@dataclass
class Settings:
    """What both sides train with; the defaults are `petune train`'s demo run, shortened to `steps`."""

    steps: int = 20  # the demo's 30 takes long on 2 shared cores; 20 x 8 records is 40% of the demo set
    batch_size: int = 8
    max_length: int = 512
    lr: float = 2e-3
    warmup_steps: int = 3
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    precision: str = "fp32"  # fp32 | bf16 (petune: bf16 base + autocast; TRL: bf16 autocast on an fp32 model)
    seed: int = 0
    data: str | None = None  # None: petune's bundled demo training set
    packing: bool = False  # petune's side packs examples into rows (TRL's stays unpacked, its default)
    padding_free: bool = True  # petune's default: each batch's examples in shared rows, the same examples a step


def data_path(settings: Settings) -> str:
    from petune.train.data import DEMO_TRAIN

    return settings.data or str(DEMO_TRAIN)


def petune_options(settings: Settings, output: str) -> dict[str, Any]:
    """`petune train` options for `settings`: the whole file trains (nothing held out), no evaluation, no saving."""
    return {
        "data": data_path(settings), "val_fraction": 0.0, "output": output, "overwrite": True, "method": "lora",
        "max_steps": settings.steps, "batch_size": settings.batch_size, "grad_accum": 1, "lr": settings.lr,
        "schedule": settings.schedule, "warmup_steps": settings.warmup_steps, "weight_decay": settings.weight_decay,
        "max_grad_norm": settings.max_grad_norm, "max_length": settings.max_length, "train_on_prompt": False,
        "packing": settings.packing, "padding_free": settings.padding_free, "precision": settings.precision,
        "eval_every": 0, "save_every": 0,
        "eval_samples": 0, "seed": settings.seed,
        "lora": {"r": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
                 "target_modules": list(settings.target_modules)},
    }  # fmt: skip


def petune_order(settings: Settings) -> list[int]:
    """Indices of the records petune trains on, step after step (its seeded shuffle, a new one per epoch)."""
    from petune.train.config import build_config
    from petune.train.data import read_rows
    from petune.train.loop import micro_batches

    cfg = build_config(petune_options(settings, "unused"))
    count = len(read_rows(data_path(settings)))
    return [i for step in range(settings.steps) for ids in micro_batches(step, count, cfg, 1, 0) for i in ids]


def memory_results(loop_start_rss_mb: float) -> dict[str, Any]:
    import torch

    from petune.memory import running_allocator
    from petune.plan.measure import peak_mb

    result = {"peak_rss_mb": peak_mb(), "loop_start_rss_mb": loop_start_rss_mb, "allocator": running_allocator()}
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_petune(settings: Settings) -> dict[str, Any]:
    """`petune train`'s loop on `settings`; tokens are counted from the batches its stream gives each step."""
    from petune.plan.measure import resident_mb
    from petune.train import loop
    from petune.train.config import build_config
    from petune.train.data import IGNORE_INDEX

    with tempfile.TemporaryDirectory(prefix="petune-e2e-") as output:
        cfg = build_config(petune_options(settings, output))
        run = loop.setup(cfg)
        loop_start_rss = resident_mb()
        started, cpu_started = time.perf_counter(), time.process_time()
        loop.train_steps(run, 0)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        rows = [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]
    # the rows trained on (records, or packed rows of several), step after step
    steps = [loop.micro_batches(step, len(run.data.train), cfg, 1, 0) for step in range(settings.steps)]
    examples = [run.data.train[i] for batches in steps for ids in batches for i in ids]
    losses = [row["loss"] for row in rows if "loss" in row]
    return {
        "tokens": sum(len(e.input_ids) for e in examples),
        "labelled_tokens": sum(label != IGNORE_INDEX for e in examples for label in e.labels),
        "loop_s": seconds,
        "loop_cpu_s": cpu_seconds,
        "losses": losses,
        "packing": settings.packing,
        **memory_results(loop_start_rss),
    }


def run_trl(settings: Settings, records_file: str, model_dir: str, adapters: str = "peft") -> dict[str, Any]:
    """TRL's SFTTrainer with a peft LoraConfig (or, `adapters="petune"`, a model wrapped by petune's
    `get_peft_model` with the same config) on `settings`, reading the records of `records_file` in order."""
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import petune
    from petune.plan.measure import resident_mb  # petune's modules add under 1 MB to a process that has torch

    class LoopClock(TrainerCallback):
        """Wall and CPU time from the trainer's `on_train_begin` to its `on_train_end`: the training loop."""

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.rss, self.started, self.cpu_started = resident_mb(), time.perf_counter(), time.process_time()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.seconds, self.cpu_seconds = time.perf_counter() - self.started, time.process_time() - self.cpu_started

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # as petune does
        tokenizer.pad_token = tokenizer.eos_token
    library: Any = petune if adapters == "petune" else peft
    lora = library.LoraConfig(
        task_type="CAUSAL_LM", r=settings.lora_r, lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout, target_modules=list(settings.target_modules),
    )  # fmt: skip
    if adapters == "petune":  # TRL's peft_config= takes only peft's configs: wrap first, as README shows
        model, lora = petune.get_peft_model(model, lora), None
    clock = LoopClock()
    with tempfile.TemporaryDirectory(prefix="trl-e2e-") as output:
        trainer = SFTTrainer(
            model=model,
            args=trl_config(SFTConfig, settings, output),
            train_dataset=Dataset.from_list(json.loads(Path(records_file).read_text())),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[clock],
        )
        trainer.train()
    used = trainer.train_dataset.select(range(min(len(trainer.train_dataset), settings.steps * settings.batch_size)))
    return {
        "tokens": sum(len(ids) for ids in used["input_ids"]),
        "labelled_tokens": sum(label != -100 for labels in used["labels"] for label in labels),
        "loop_s": clock.seconds,
        "loop_cpu_s": clock.cpu_seconds,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        **memory_results(clock.rss),
    }


def trl_config(config_class: Any, settings: Settings, output: str) -> Any:
    """SFTConfig matching petune's run; TRL's own defaults that differ from petune's are set explicitly."""
    return config_class(
        output_dir=output,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.schedule,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch_fused",  # its default, and the kernel petune train uses (petune.optim)
        max_length=settings.max_length,
        packing=False,
        completion_only_loss=True,
        gradient_checkpointing=False,  # TRL defaults to True; petune trains without it
        bf16=settings.precision == "bf16",  # TRL defaults to True
        train_sampling_strategy="sequential",  # the records come in petune's order
        seed=settings.seed,
        logging_steps=1,  # a loss per step, like petune's metrics.jsonl
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_side(side: str, settings: Settings, records_file: str | None, model_dir: str | None) -> dict[str, Any]:
    """One side's measurement in this process, with tokens/s and the versions it ran with."""
    import torch
    import transformers

    if side in ("trl", TRL_PETUNE):
        if records_file is None or model_dir is None:
            raise SystemExit(f"{side} needs --records and --model-dir (e2e_trl.py writes and passes them)")
        result = run_trl(settings, records_file, model_dir, "petune" if side == TRL_PETUNE else "peft")
        import peft
        import trl

        import petune

        versions = {"trl": trl.__version__, "peft": peft.__version__, "petune": petune.__version__}
    else:
        result = run_petune(settings)
        import petune

        versions = {"petune": petune.__version__}
    versions.update(torch=torch.__version__, transformers=transformers.__version__)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"side": side, **result, "tokens_per_s": result["tokens"] / result["loop_s"], "device": device, **versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=(*SIDES, TRL_PETUNE))
    parser.add_argument("--settings", default="{}", help="Settings fields as JSON; the rest keep their defaults")
    parser.add_argument("--records", help="trl: the records to train on, in order (JSON list)")
    parser.add_argument("--model-dir", help="trl: the model folder (petune's side loads the embedded model)")
    args = parser.parse_args()
    settings = Settings(**json.loads(args.settings))
    settings.target_modules = tuple(settings.target_modules)  # a list after JSON
    print(RESULT_PREFIX + json.dumps(run_side(args.side, settings, args.records, args.model_dir)))


if __name__ == "__main__":
    main()

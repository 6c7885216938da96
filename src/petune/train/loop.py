"""The training loop, top to bottom: load -> wrap -> (resume) -> steps -> adapter (or model), metrics, plot, eval.

One optimizer step takes a global batch of `batch_size x grad_accum x processes` examples. Each
process sums its token losses and every sum is divided by the token count of the whole global batch,
so one process with 2 micro-batches, or 2 processes with 1 each, compute the same update.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from petune import PeftModel
from petune.embedded import resolve_model_path
from petune.optim import adamw
from petune.train import UserError, checkpoint, report, strategy, trackers
from petune.train.config import TrainConfig
from petune.train.data import IGNORE_INDEX, Dataset
from petune.train.engines import Engine, frozen_bytes, make_engine
from petune.train.evaluate import accuracy
from petune.train.methods import (
    after_optimizer_step,
    as_base_model,
    learning_rate,
    load_base,
    load_training_state,
    loss_penalty,
    trainable_model,
    training_state,
)
from petune.train.objective import Objective, SftObjective, keeps_packed_examples_apart, load_data, objective_for


@dataclass
class Run:
    """What one training run holds, built by `setup`."""

    cfg: TrainConfig
    accelerator: Accelerator
    run_dir: Path
    model: PeftModel | PreTrainedModel  # a plain transformers model for full fine-tuning
    tokenizer: PreTrainedTokenizerBase
    data: Dataset
    objective: Objective  # sft or dpo: how a batch is made and what its loss is
    engine: Engine  # --strategy: the prepared model (`engine.trained`) and optimizer, backward, step, state
    peak_lr: float
    use_bf16: bool

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.accelerator.num_processes


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run `cfg` and return the final results (also written to `<output>/eval.json`)."""
    run = setup(cfg)
    try:
        start_step, results = resume_or_score_base(run)
        train_steps(run, start_step)
        return finish(run, results)
    finally:  # data-parallel processes leave their gloo group before exiting, not in a teardown race with it
        run.accelerator.end_training()


def setup(cfg: TrainConfig) -> Run:
    """The run folder, base model, data, adapter (none for full fine-tuning) and optimizer."""
    cfg.output = cfg.output or report.default_output(cfg.method)
    accelerator = strategy.make_accelerator(cfg, trackers.make_trackers(cfg.report_to, Path(cfg.output)) or None)
    cfg.nproc = accelerator.num_processes  # as launched (`--nproc` or torchrun)
    if cfg.nproc > 1 and accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.nproc))
    main = accelerator.is_main_process
    run_dir = report.prepare_run_dir(cfg) if main else Path(cfg.output)
    accelerator.wait_for_everyone()

    torch.manual_seed(cfg.seed)
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    with strategy.loading_dtype(dtype):
        base, tokenizer = load_base(cfg, dtype)
    data = load_data(cfg, tokenizer)
    model = trainable_model(cfg, base, resolve_model_path(cfg.model))
    if cfg.method != "qlora" and accelerator.device.type != "cpu":  # a 4-bit model is placed when loaded
        # not on a CPU: there the weights already are, and `.to("cpu:0")` (accelerate's device for a process
        # of a CPU group) would copy every tensor the model file maps into fresh memory (+0.6 GB on SmolLM2)
        model.to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    peak_lr = learning_rate(cfg)
    optimizer = adamw(params, lr=peak_lr, weight_decay=cfg.weight_decay)
    engine = make_engine(cfg.strategy, accelerator, model, optimizer, cfg.grad_accum)  # DDP, ZeRO or FSDP2
    run = Run(cfg, accelerator, run_dir, model, tokenizer, data, objective_for(cfg), engine, peak_lr, use_bf16)
    check_packing(run)
    if main:
        report.describe_start(cfg, run_dir, data, model, run.global_batch, peak_lr)
        cfg.save(run_dir / "config.yaml")
        trackers.start(accelerator, cfg.to_dict())
    if cfg.strategy != "ddp":
        describe_sharding(cfg, accelerator, model)
    return run


def check_packing(run: Run) -> None:
    """Rows that hold several examples need attention that keeps them apart: `--packing` is refused without it,
    and padding-free batches fall back to padded rows, saying so."""
    objective, cfg = run.objective, run.cfg
    if not (cfg.packing or (isinstance(objective, SftObjective) and objective.pack_length)):
        return
    apart = keeps_packed_examples_apart(run.engine.trained, run.accelerator.device)
    run.engine.forward_only_done()
    if apart:
        return
    kind = getattr(getattr(run.model, "config", None), "model_type", "this model")
    what = f"{kind}'s attention does not keep examples in one row apart"
    if cfg.packing:
        raise UserError(f"--packing: {what}; drop --packing")
    assert isinstance(objective, SftObjective)
    objective.pack_length = None
    if run.accelerator.is_main_process:
        print(f"padding-free batches off: {what} (padded rows instead)")


def describe_sharding(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module) -> None:
    """Print the strategy and the bytes of frozen weights each process holds (every process calls this)."""
    held, whole = frozen_bytes(model)  # after the engine sharded the model
    held_each = accelerator.gather(torch.tensor([held], device=accelerator.device)).tolist()
    if accelerator.is_main_process:
        mb = ", ".join(f"{b / 1e6:.2f}" for b in held_each)
        print(f"{strategy.describe(cfg)} | frozen weights held per process: {mb} MB of {whole / 1e6:.2f} MB")


def resume_or_score_base(run: Run) -> tuple[int, dict[str, Any]]:
    """(first step, results so far): the latest checkpoint's state, or the base model's accuracy."""
    cfg, main = run.cfg, run.accelerator.is_main_process
    start_step, results = 0, report.read_results(run.run_dir)
    found: Path | None = None
    state: dict[str, Any] = {}
    if cfg.resume:
        rank, barrier = run.accelerator.process_index, run.accelerator.wait_for_everyone
        found, state = checkpoint.restore(run.run_dir, run.engine, rank, barrier, say=_say(main))
    if found is not None:
        if state["global_batch"] != run.global_batch:
            raise UserError(f"{found} was made with a global batch of {state['global_batch']}, not {run.global_batch}")
        start_step = state["step"]
        load_training_state(run.model, state.get("method_state", {}))
    elif main and cfg.eval_before and scores_by_generation(cfg) and run.data.val_records and "before" not in results:
        with as_base_model(run.model):
            results["before"] = accuracy(run.model, run.tokenizer, run.data.val_records[: cfg.eval_samples])
        report.write_results(run.run_dir, results)  # kept for a resumed run
        print(f"base model, held-out exact match: {results['before']['exact_match']:.1%}")
    if main and cfg.resume:
        report.truncate_metrics(run.run_dir, start_step)  # rows a killed run logged after its checkpoint
        print(
            f"resuming from {found} (step {start_step})" if found else "no intact checkpoint yet: starting from step 0"
        )
    run.accelerator.wait_for_everyone()
    return start_step, results


def scores_by_generation(cfg: TrainConfig) -> bool:
    """Whether the run scores held-out records by generation (on the main process alone): not under a sharded
    strategy, where every generated token would need every process."""
    return bool(cfg.eval_samples) and cfg.strategy not in strategy.SHARDED


def _say(main: bool) -> Any:
    """`print` on the main process, nothing elsewhere."""
    return print if main else lambda *_: None


def train_steps(run: Run, start_step: int) -> None:
    """Optimizer steps `start_step` .. `max_steps` - 1, with held-out loss and checkpoints every N steps."""
    cfg, accelerator = run.cfg, run.accelerator
    run.engine.trained.train()
    metrics = report.Metrics(run.run_dir / "metrics.jsonl", accelerator.is_main_process, trackers.logger(accelerator))
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not accelerator.is_main_process or None, unit="step")
    for step in range(start_step, cfg.max_steps):
        row = optimizer_step(run, step)
        metrics.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        done = step + 1
        if done == cfg.max_steps:
            break
        if run.data.val and cfg.eval_every and done % cfg.eval_every == 0:
            evaluation = heldout(run)
            metrics.log(eval_row(done, evaluation))
            if accelerator.is_main_process:
                bar.write(f"step {done}: loss {row['loss']:.4f}, held-out loss {evaluation['loss']:.4f}")
        if cfg.save_every and done % cfg.save_every == 0:
            extra: dict[str, Any] = {"global_batch": run.global_batch, "examples_seen": done * run.global_batch}
            extra["method_state"] = training_state(run.model)
            rank, barrier = accelerator.process_index, accelerator.wait_for_everyone
            checkpoint.save(run.run_dir, done, run.engine, extra, rank, barrier, cfg.keep_checkpoints)
    bar.close()


def optimizer_step(run: Run, step: int) -> dict[str, float]:
    """One step on this process's share of the global batch; returns the metrics row."""
    cfg, accelerator, world, engine = run.cfg, run.accelerator, run.accelerator.num_processes, run.engine
    started = time.perf_counter()
    lr = lr_at(step, cfg, run.peak_lr)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    pad, objective = run.tokenizer.pad_token_id, run.objective
    batches = [
        objective.collate([run.data.train[i] for i in ids], pad)
        for ids in micro_batches(step, len(run.data.train), cfg, world, accelerator.process_index)
    ]
    batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches]
    units = sum(objective.units(b) for b in batches)  # labelled tokens (sft) or pairs (dpo)
    seen = sum(int(b["attention_mask"].sum()) for b in batches)
    counts = torch.tensor([units, seen], dtype=torch.float64, device=accelerator.device)
    counts = accelerator.reduce(counts, "sum") if world > 1 else counts  # over the global batch
    sums: dict[str, torch.Tensor] = {}  # "loss" and the objective's other metrics, summed over micro-batches
    for index, batch in enumerate(batches):
        with engine.micro_batch(last=index == len(batches) - 1):
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
                loss_sum, extra = objective.loss_sum(engine.trained, run.model, batch)
            # every engine averages gradients over processes; x world turns that average back into a sum.
            loss = loss_sum * world / counts[0].clamp(min=1)
            penalty = loss_penalty(run.model) if index == len(batches) - 1 else None  # once per step, every process
            engine.backward(loss if penalty is None else loss + penalty)
        for name, value in {"loss": loss_sum, **extra}.items():
            sums[name] = sums.get(name, 0) + value.detach().double()
    grad_norm = engine.step(cfg.max_grad_norm or math.inf, after=lambda: after_optimizer_step(run.model, step))
    totals = torch.stack(list(sums.values()))
    totals = accelerator.reduce(totals, "sum") if world > 1 else totals
    means = dict(zip(sums, (totals / counts[0].clamp(min=1)).tolist(), strict=True))
    tokens_per_s = counts[1].item() / (time.perf_counter() - started)
    row = {"step": step + 1, "loss": means.pop("loss"), "lr": lr, "grad_norm": grad_norm}
    return {**row, "tokens_per_s": tokens_per_s, **means}


def finish(run: Run, results: dict[str, Any]) -> dict[str, Any]:
    """Final held-out loss and accuracy; the adapter (or model), eval.json, plot and summary (main process)."""
    cfg = run.cfg
    final = heldout(run) if run.data.val else None
    with run.engine.gathered() as tensors:  # the trained tensors whole (sharded strategies gather them)
        if run.accelerator.is_main_process:
            if final is not None:
                row = eval_row(cfg.max_steps, final)
                report.Metrics(run.run_dir / "metrics.jsonl", True, trackers.logger(run.accelerator)).log(row)
                results["heldout"] = final
            if scores_by_generation(cfg) and run.data.val_records:
                results["after"] = accuracy(run.model, run.tokenizer, run.data.val_records[: cfg.eval_samples])
            state = tensors if run.engine.saves_state else None
            report.finish(run.run_dir, run.model, run.tokenizer, cfg, results, run.data, state)
        else:  # takes part in what the main process's save computes (see checkpoint.save_trained_tensors)
            checkpoint.save_trained_tensors(run.engine, tensors, run.run_dir / "adapter", main=False)
    run.accelerator.wait_for_everyone()
    return results


def heldout(run: Run) -> dict[str, float]:
    """Held-out loss, each process scoring its share of the examples.

    Under a sharded strategy every forward pass needs every process, so the shares are made the same length
    with copies of an example whose labels are all ignored (no loss, no tokens).
    """
    accelerator, world = run.accelerator, run.accelerator.num_processes
    share = run.data.val[accelerator.process_index :: world]
    if run.cfg.strategy in strategy.SHARDED and run.data.val:
        blank = dataclasses.replace(run.data.val[0], labels=[IGNORE_INDEX] * len(run.data.val[0].labels))
        share = share + [blank] * (math.ceil(len(run.data.val) / world) - len(share))
    reduce = functools.partial(accelerator.reduce, reduction="sum") if accelerator.num_processes > 1 else None
    pad = run.tokenizer.pad_token_id
    return run.objective.heldout(run.model, share, pad, run.cfg.batch_size, accelerator.device, reduce)


def eval_row(step: int, evaluation: dict[str, float]) -> dict[str, float]:
    """The metrics.jsonl row of a held-out evaluation: its metrics as `eval_<name>`, without the item counts."""
    return {"step": step, **{f"eval_{k}": v for k, v in evaluation.items() if k not in ("tokens", "pairs")}}


def lr_at(step: int, cfg: TrainConfig, peak: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the schedule down to 0."""
    if step < cfg.warmup_steps:
        return peak * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return peak * (1.0 - progress)
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


@functools.lru_cache(maxsize=4)
def _epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def micro_batches(step: int, count: int, cfg: TrainConfig, world: int, rank: int) -> list[list[int]]:
    """Indices of the examples process `rank` trains on at `step`, one list per micro-batch.

    The examples are a fixed shuffled stream (a new permutation per epoch), so the data position is
    the step number: resuming needs no sampler state. Micro-batch m of process r is slice m * world + r
    of the global batch, so the global batch does not depend on how it is split.
    """
    size = cfg.batch_size
    first = step * size * cfg.grad_accum * world
    batches = []
    for micro in range(cfg.grad_accum):
        start = first + (micro * world + rank) * size
        batches.append([_epoch_order(count, cfg.seed, k // count)[k % count] for k in range(start, start + size)])
    return batches

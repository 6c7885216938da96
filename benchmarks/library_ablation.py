"""What each of petune's pieces is worth on the library path: the step with one piece changed, against the default.

The library path is `benchmarks/step.py --loop library` (`loss = model(**batch, labels=...).loss; loss.backward()`,
AdamW), petune, bf16, on the embedded SmolLM2 at 4 x 256 tokens. Each variant changes one thing:

    sdpa           petune's blocked attention kernel off: torch's SDPA (kernels/attention.py)
    stock-rmsnorm  transformers' RMSNorm instead of petune's (kernels/rms_norm.py)
    stock-mlp      transformers' gated MLP instead of petune's SwiGLU (kernels/swiglu.py)
    op-by-op       RMSNorm's and SwiGLU's forward and backward passes and the loss's softmax op by op, not
                   petune's C kernels (PETUNE_NATIVE=0, kernels/native.py)
    chunk-128      the loss in chunks of 128 labelled positions, not 256 (petune/loss.py)
    row-blocks     every frozen bf16 projection's products in two halves of the rows where that timed faster on
                   first use (an experiment, not in petune: see benchmarks/row_blocks.py)
    loss-dropped   (`--memory` only) the loop drops each step's loss before the next step, where the default keeps
                   it until the next step returns, as `loss = model(...).loss` in a loop does

Step time: one fresh process, steps alternating between the default and each variant in turn after two warm-up
steps, medians of `--pairs` each (differences of a few percent are within this machine's noise: compare runs).
Peak memory (`--memory`): one fresh process per setting, `--steps` steps, peak RSS. Both on `--allocator`.

    python benchmarks/library_ablation.py --method lora                       # step times, mimalloc
    python benchmarks/library_ablation.py --method prefix --memory --allocator system
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import e2e_trl  # benchmarks/, on the path when this file runs as a script
import step
import torch
import torch.nn.functional as F

VARIANTS = ["sdpa", "stock-rmsnorm", "stock-mlp", "op-by-op", "chunk-128", "row-blocks"]
LOOP_VARIANTS = ["loss-dropped"]  # how the loop is written, not petune: --memory only


def apply(variant: str) -> Callable[[], None]:
    """Switch `variant` on; returns the function that switches it off again."""
    import petune.loss
    from petune.kernels import attention, rms_norm, swiglu

    if variant == "sdpa":
        length = attention.MAX_LENGTH
        attention.MAX_LENGTH = 0  # no call qualifies: every one goes to SDPA

        def undo() -> None:
            attention.MAX_LENGTH = length

        return undo
    if variant in ("stock-rmsnorm", "stock-mlp"):
        cls: Any = rms_norm.RMSNormForward if variant == "stock-rmsnorm" else swiglu.SwiGLUMLPForward
        call = cls.__call__
        cls.__call__ = lambda self, x: type(self.module).forward(self.module, x)
        return lambda: setattr(cls, "__call__", call)
    if variant == "op-by-op":
        setting = os.environ.get("PETUNE_NATIVE")
        os.environ["PETUNE_NATIVE"] = "0"

        def restore() -> None:
            if setting is None:
                del os.environ["PETUNE_NATIVE"]
            else:
                os.environ["PETUNE_NATIVE"] = setting

        return restore
    if variant == "chunk-128":
        defaults = petune.loss.causal_lm_loss.__defaults__
        petune.loss.causal_lm_loss.__defaults__ = (128, None)
        return lambda: setattr(petune.loss.causal_lm_loss, "__defaults__", defaults)
    if variant == "row-blocks":
        F.linear = _row_blocks_linear  # what nn.Linear.forward calls
        return lambda: setattr(F, "linear", _LINEAR)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


_PLANS: dict[tuple[int, ...], int] = {}
_LINEAR = F.linear
GAIN = 0.95  # two row blocks only where they take under 95% of one product's time


def _mm(a: torch.Tensor, b: torch.Tensor, blocks: int) -> torch.Tensor:
    if blocks == 1:
        return torch.mm(a, b)
    out = a.new_empty(a.shape[0], b.shape[1])
    step = -(-a.shape[0] // blocks)
    for start in range(0, a.shape[0], step):
        torch.mm(a[start : start + step], b, out=out[start : start + step])
    return out


def _timed_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` in 1 or 2 row blocks, whichever ran faster for this shape (best of 3 each, first use)."""
    key = (*a.shape, *b.shape, int(b.is_contiguous()))
    if key not in _PLANS:
        best = {1: float("inf"), 2: float("inf")}
        for _ in range(3):
            for blocks in best:
                start = time.perf_counter()
                _mm(a, b, blocks)
                best[blocks] = min(best[blocks], time.perf_counter() - start)
        _PLANS[key] = 2 if best[2] < GAIN * best[1] else 1
    return _mm(a, b, _PLANS[key])


class _RowBlocksLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _timed_mm(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return _timed_mm(grad.reshape(-1, grad.shape[-1]), weight).view(*grad.shape[:-1], weight.shape[1]), None


def _row_blocks_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    frozen = bias is None and not weight.requires_grad and x.dtype == weight.dtype == torch.bfloat16
    if frozen and torch.is_grad_enabled() and x.numel() >= 512 * x.shape[-1]:
        out: torch.Tensor = _RowBlocksLinear.apply(x, weight)
        return out
    return _LINEAR(x, weight, bias)


def training_step(method: str) -> Callable[[], torch.Tensor]:
    model = step.wrapped("petune", method, step.load_base(method, torch.bfloat16))
    return step.training_step("petune", model, loop="library")


def time_variants(method: str, variants: list[str], pairs: int) -> None:
    train_step = training_step(method)
    for _ in range(2):
        train_step()
    print(f"| variant | default step s | variant step s | variant / default |  ({method}, {pairs} pairs)")
    print("|---|---|---|---|")
    for variant in variants:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(pairs):
            for changed in (False, True):
                undo = apply(variant) if changed else None
                start = time.perf_counter()
                train_step()
                times[changed].append(time.perf_counter() - start)
                if undo is not None:
                    undo()
        default, changed_s = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {variant} | {default:.3f} | {changed_s:.3f} | {changed_s / default:.3f} |", flush=True)


def one_process(method: str, variant: str, steps: int) -> None:
    """Run `steps` steps with `variant` on (or none) and print step median and peak RSS as JSON."""
    from petune.plan.measure import peak_mb

    if variant not in ("default", *LOOP_VARIANTS):
        apply(variant)
    train_step = training_step(method)
    times = []
    loss = None
    for _ in range(steps):
        start = time.perf_counter()
        loss = train_step()  # kept until the next step returns, as a user's loop keeps it
        if variant == "loss-dropped":
            loss = None
        times.append(time.perf_counter() - start)
    del loss
    print(json.dumps({"variant": variant, "step_s": statistics.median(times[1:]), "peak_rss_mb": peak_mb()}))


def memory(method: str, variants: list[str], steps: int, allocator: str) -> None:
    print(f"| variant | peak RSS MB | step s |  ({method}, {allocator} allocator, {steps} steps, fresh process each)")
    print("|---|---|---|")
    for variant in ["default", *variants]:
        command = [sys.executable, __file__, "--method", method, "--one", variant, "--steps", str(steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=e2e_trl.environment(allocator))
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(f"| {variant} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1]} | |")
            continue
        result = json.loads(lines[-1])
        print(f"| {variant} | {result['peak_rss_mb']:.0f} | {result['step_s']:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=["lora", "prefix", "prompt"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + LOOP_VARIANTS)
    parser.add_argument("--pairs", type=int, default=8, help="alternating default/variant steps per variant")
    parser.add_argument("--memory", action="store_true", help="peak RSS: one fresh process per setting")
    parser.add_argument("--allocator", choices=["system", "mimalloc"], default="mimalloc")
    parser.add_argument("--steps", type=int, default=5, help="steps per process with --memory")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one --memory process
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)  # internal: the timing process
    args = parser.parse_args()
    if args.one:
        one_process(args.method, args.one, args.steps)
    elif args.memory:
        variants = args.variants if args.variants != VARIANTS else VARIANTS + LOOP_VARIANTS
        memory(args.method, variants, args.steps, args.allocator)
    elif args.here:
        time_variants(args.method, [v for v in args.variants if v not in LOOP_VARIANTS], args.pairs)
    else:  # the timing in a fresh process on the allocator asked for
        command = [sys.executable, __file__, "--here", "--method", args.method, "--pairs", str(args.pairs)]
        subprocess.run([*command, "--variants", *args.variants], check=True, env=e2e_trl.environment(args.allocator))


if __name__ == "__main__":
    main()

"""`petune plan`: memory by component, fit, largest batch and sequence, trainable parameters and FLOPs per token,
for one or more methods on one model and device. A table, or `--json`."""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from petune.plan.architectures import Architecture, resolve_architecture
from petune.plan.counts import flops_per_token
from petune.plan.gpus import DEFAULT_GPU, GIB, Device, named_device, sized_device
from petune.plan.memory import COMPONENTS, Plan, largest_fitting, plan
from petune.plan.setup import METHODS, OPTIMIZER_STATES, Setup, parse_targets
from petune.train import UserError

DEFAULT_METHODS = ("full", "lora", "dora", "qlora", "prompt", "ptuning", "prefix")
DTYPES = {  # --dtype -> Setup.precision; fp16 has bf16's sizes
    "fp32": "fp32",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16-true": "bf16-true",
    "fp16": "bf16-mixed",
    "fp16-mixed": "bf16-mixed",
    "fp16-true": "bf16-true",
}
LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "activations": "activations",
    "logits_loss": "logits/loss",
    "framework_overhead": "framework overhead",
}
PHASES = {"backward start": "backward", "optimizer step": "opt. step"}  # "model load" as it is


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `petune plan` options (the parser itself is made in petune.cli)."""
    parser.add_argument(
        "--model",
        default="embedded",
        help="a built-in name (llama-2-7b, qwen2.5-72b, ... `--model list`), a config.json or model folder, or a "
        ".gguf file (default: embedded, SmolLM2-135M)",
    )
    parser.add_argument(
        "--method",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each layer in backward (default: off)"
    )
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", metavar="NAME", help=f"a named GPU, or cpu for this machine (default: {DEFAULT_GPU})")
    device.add_argument("--gpu-memory", metavar="GB", type=float, help="device memory in GB (GiB) instead of --gpu")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="fp32; bf16 = bf16-mixed (16-bit compute, fp32 master weights); bf16-true (16-bit only) "
        "(default: bf16-mixed on a GPU, fp32 on cpu)",
    )
    parser.add_argument(
        "--optimizer-state",
        choices=list(OPTIMIZER_STATES),
        default="fp32",
        help="AdamW's moments: fp32, bf16 or 8bit (default: fp32)",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument(
        "--lora-targets", default="q_proj,v_proj", help="adapted layers, or all-linear (default: q_proj,v_proj)"
    )
    parser.add_argument("--virtual-tokens", type=int, default=20, help="prompt/p-/prefix tuning (default: 20)")
    parser.add_argument(
        "--encoder-hidden-size",
        type=int,
        help="width of p-tuning's MLP or prefix tuning's projection (default: petune train's, 128 and 512)",
    )
    parser.add_argument(
        "--prefix-projection",
        choices=["true", "false"],
        default="true",
        help="prefix tuning through its projection MLP, as petune train does by default (default: true)",
    )
    parser.add_argument(
        "--strategy",
        default="ddp",
        help="ddp | zero2 | zero3 | fsdp: how --nproc devices share the model; memory is per device (default: ddp)",
    )
    parser.add_argument("--nproc", type=int, default=1, help="devices (processes) training together (default: 1)")
    parser.add_argument(
        "--offload", default="none", help="none | optimizer | params: state kept in CPU memory (default: none)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Plan every requested method and print the table (or JSON) to `out`."""
    if args.model.lower() == "list":
        from petune.plan.architectures import ARCHITECTURES

        for name, arch in ARCHITECTURES.items():
            print(f"{name:14s} {arch.source}", file=out)
        return 0
    arch = resolve_architecture(args.model)
    device = sized_device(args.gpu_memory) if args.gpu_memory is not None else named_device(args.gpu or DEFAULT_GPU)
    precision = DTYPES[args.dtype] if args.dtype else ("fp32" if device.kind == "cpu" else "bf16-mixed")
    methods = [m.strip().lower() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise UserError("--method needs at least one method")
    plans = []
    for method in methods:
        setup = Setup(
            method=method,
            precision=precision,
            optimizer_state=args.optimizer_state,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            gradient_checkpointing=args.gradient_checkpointing,
            lora_r=args.lora_r,
            lora_targets=parse_targets(args.lora_targets),
            virtual_tokens=args.virtual_tokens,
            encoder_hidden_size=args.encoder_hidden_size or encoder_width(method),
            prefix_projection=args.prefix_projection == "true",
            strategy=args.strategy,
            nproc=args.nproc,
            offload=args.offload,
        )
        plans.append(plan(arch, setup, device))
    if args.json:
        objects = [as_dict(p) for p in plans]
        print(json.dumps(objects[0] if len(objects) == 1 else {"plans": objects}, indent=2), file=out)
    else:
        print_table(arch, device, plans, out)
    return 0


def encoder_width(method: str) -> int:
    """`petune train`'s default width of the method's encoder MLP (p-tuning's, or prefix tuning's projection)."""
    from petune.train.config import TrainConfig

    return int(getattr(getattr(TrainConfig(), method, None), "encoder_hidden_size", 128))


def largest(p: Plan) -> tuple[int, int]:
    """(largest batch at this sequence length, longest sequence at this batch size) that fit."""
    batch = largest_fitting(p.architecture, p.setup, p.device, "batch_size", 1 << 16)
    seq = largest_fitting(p.architecture, p.setup, p.device, "seq_len", p.architecture.max_position_embeddings)
    return batch, seq


def as_dict(p: Plan) -> dict[str, Any]:
    """One plan as the JSON object `--json` prints (memory in GB = GiB)."""
    batch, seq = largest(p)
    s = p.setup
    return {
        "model": p.architecture.name,
        "model_source": p.architecture.source,
        "method": s.method,
        "dtype": s.precision,
        "optimizer_state": s.optimizer_state,
        "batch_size": s.batch_size,
        "seq_len": s.seq_len,
        "gradient_checkpointing": s.gradient_checkpointing,
        "lora_r": s.lora_r if s.adapted else None,
        "lora_targets": list(s.adapted) or None,
        "strategy": s.strategy,
        "nproc": s.nproc,
        "offload": s.offload,
        "device": p.device.name,
        "device_gb": round(p.device.memory_bytes / GIB, 2),
        "total_gb": round(p.total_bytes / GIB, 3),
        "fits": p.fits,
        "components": {name: round(p.components[name] / GIB, 3) for name in COMPONENTS},
        "component_max_gb": {name: round(p.sizes[name] / GIB, 3) for name in COMPONENTS},
        "peak_phase": p.peak_phase,
        "max_batch_size": batch,
        "max_seq_len": seq,
        "trainable_params": p.trainable_params,
        "total_params": p.total_params,
        "flops_per_token": flops_per_token(p.architecture, s),
    }


def print_table(arch: Architecture, device: Device, plans: list[Plan], out: TextIO) -> None:
    """Methods as columns, components as rows (GB at the step's peak), then fit, limits and counts."""
    s = plans[0].setup
    print(f"model   {arch.name}: {_count(plans[0].total_params)} parameters ({arch.source})", file=out)
    print(f"device  {device.name}: {device.memory_bytes / GIB:.1f} GB ({device.kind})", file=out)
    ckpt = "gradient checkpointing" if s.gradient_checkpointing else "no checkpointing"
    state = f"AdamW {s.optimizer_state} moments"
    print(f"step    batch {s.batch_size} x {s.seq_len} tokens, {s.precision}, {state}, {ckpt}", file=out)
    if s.strategy != "ddp" or s.nproc > 1:
        offload = "" if s.offload == "none" else f", {s.offload} offloaded to CPU"
        print(f"devices {s.nproc} under {s.strategy}{offload}: memory per device", file=out)
    print(file=out)
    limits = [largest(p) for p in plans]
    rows: list[tuple[str, list[str]]] = [("GB at the peak", [p.setup.method for p in plans])]
    rows += [(LABELS[name], [f"{p.components[name] / GIB:.2f}" for p in plans]) for name in COMPONENTS]
    rows += [
        ("total", [f"{p.total_bytes / GIB:.2f}" for p in plans]),
        ("fits", ["yes" if p.fits else "NO" for p in plans]),
        ("peak during", [PHASES.get(p.peak_phase, p.peak_phase) for p in plans]),
        (f"largest batch x {s.seq_len}", [str(b) for b, _ in limits]),
        (f"longest seq, batch {s.batch_size}", [str(q) for _, q in limits]),
        ("trainable params", [_count(p.trainable_params) for p in plans]),
        ("GFLOP per token", [f"{flops_per_token(arch, p.setup) / 1e9:.2f}" for p in plans]),
    ]
    first = max(len(label) for label, _ in rows)
    width = max(9, *(len(v) + 1 for _, values in rows for v in values))
    for label, values in rows:
        print(label.ljust(first) + "".join(v.rjust(width) for v in values), file=out)
    print(
        "\nGB = GiB. Memory at the peak of a step: at the start of backward (all activations, few gradients) or "
        "at the optimizer step (all gradients, no activations), whichever is larger. Activations count what a "
        "transformers Llama layer saves with SDPA attention; the loss is petune's chunked loss. Sources: "
        "petune/plan/*.py; checked against measured CPU peaks in tests/plan/test_calibration.py.",
        file=out,
    )


def _count(n: int) -> str:
    """12_345_678 -> '12.3M'."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)

"""Measure what `petune plan` predicts: the peak resident memory of petune training steps on this CPU.

    python -m petune.plan.measure --model embedded --method lora --batch-size 2 --seq-len 64
    python -m petune.plan.measure --model tiny.json --method full --gradient-checkpointing
    python -m petune.plan.measure --overhead    # what `petune.plan.overhead` measures on this machine

Run it in a fresh process (peak RSS is per process). It imports what a training step needs, notes the
resident memory, builds the model (fp32; the embedded model's real weights, any other config.json with
random ones), wraps it with petune, runs three AdamW steps of petune's chunked loss like benchmarks/step.py,
and prints one JSON object: `before_mb` (resident before the model existed), `peak_mb` (ru_maxrss),
`step_mb` (their difference), and the plan's `predicted_mb` and `predicted_step_mb` (less the imports).
"""

from __future__ import annotations

import argparse
import json
import resource
from dataclasses import replace
from pathlib import Path
from typing import Any

MIB = 2**20
TINY: dict[str, Any] = {  # a 2-layer, hidden-32 Llama: its tensors are a few kB, so its step measures the overhead
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


def resident_mb() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_mb() -> float:
    """Peak resident memory of this process so far (MiB).

    Linux's VmHWM, not ru_maxrss: ru_maxrss carries the parent's peak over fork and exec, so a child
    of a large process (pytest late in a run) would report its parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def adapter_config(setup: Any) -> Any:
    """The petune config of `setup.method` with the plan's options (None for full fine-tuning)."""
    import petune

    targets = list(setup.lora_targets)
    if setup.method in ("lora", "dora", "rslora"):
        return petune.LoraConfig(
            task_type="CAUSAL_LM",
            r=setup.lora_r,
            target_modules=targets,
            use_dora=setup.method == "dora",
            use_rslora=setup.method == "rslora",
        )
    if setup.method == "prompt":
        return petune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=setup.virtual_tokens)
    if setup.method == "ptuning":
        return petune.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=setup.virtual_tokens,
            encoder_hidden_size=setup.encoder_hidden_size,
        )
    if setup.method == "prefix":
        return petune.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=setup.virtual_tokens,
            prefix_projection=setup.prefix_projection,
            encoder_hidden_size=setup.encoder_hidden_size,
        )
    if setup.method == "full":
        return None
    raise ValueError(f"measure cannot run --method {setup.method} on a CPU")


def measure(model: str, setup: Any, steps: int = 3) -> dict[str, Any]:
    """Run `steps` training steps of `setup` on `model` in this process; return the measured and predicted MiB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    import petune
    from petune.loss import causal_lm_loss
    from petune.memory import return_freed_memory_to_os
    from petune.optim import adamw
    from petune.plan.architectures import resolve_architecture
    from petune.plan.gpus import this_cpu
    from petune.plan.memory import plan
    from petune.plan.overhead import cpu_overhead
    from petune.train.methods import enable_checkpointing

    return_freed_memory_to_os()  # no glibc heap growth: the peak is what the step holds, which plan predicts
    before = resident_mb()
    torch.manual_seed(0)
    if model == "tiny":
        network = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.float32)
    elif model.lower() in ("embedded", "smollm2"):
        from petune.embedded import embedded_model_dir

        network = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    else:
        network = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch.float32)
    loaded = resident_mb()
    if setup.gradient_checkpointing:
        enable_checkpointing(network)  # as petune train does
    config = adapter_config(setup)
    trained = network if config is None else petune.get_peft_model(network, config)
    trained.train()
    optimizer = adamw([p for p in trained.parameters() if p.requires_grad], lr=1e-4)
    vocab = network.config.vocab_size
    input_ids = torch.randint(0, vocab, (setup.batch_size, setup.seq_len))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    for _ in range(steps):
        causal_lm_loss(trained, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = peak_mb()

    if model == "tiny":
        arch_source = "tiny"
        predicted = None
    else:
        arch_source = "embedded" if model.lower() in ("embedded", "smollm2") else str(Path(model))
        predicted = plan(resolve_architecture(arch_source), replace(setup, precision="fp32"), this_cpu())
    result: dict[str, Any] = {
        "model": arch_source,
        "method": setup.method,
        "batch_size": setup.batch_size,
        "seq_len": setup.seq_len,
        "gradient_checkpointing": setup.gradient_checkpointing,
        "before_mb": round(before, 1),
        "model_mb": round(loaded - before, 1),
        "peak_mb": round(peak, 1),
        "step_mb": round(peak - before, 1),
    }
    if predicted is not None:
        result["predicted_mb"] = round(predicted.total_bytes / MIB, 1)
        result["predicted_step_mb"] = round((predicted.total_bytes - cpu_overhead().imports_bytes) / MIB, 1)
        result["predicted_phase"] = predicted.peak_phase
    return result


def main(argv: list[str] | None = None) -> None:
    from petune.plan.setup import METHODS, Setup, parse_targets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded, or a config.json (random weights)")
    parser.add_argument("--method", default="lora", choices=[m for m in METHODS if m != "qlora"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-targets", default="q_proj,v_proj")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--overhead", action="store_true", help="measure the CPU overhead with a tiny model")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    setup = Setup(
        method=args.method,
        precision="fp32",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_targets=parse_targets(args.lora_targets),
    )
    if args.overhead:
        result = measure("tiny", replace(setup, batch_size=2, seq_len=16))
        result["overhead_mb"] = round(result["peak_mb"], 1)  # the tiny model's own tensors are a few kB
    else:
        result = measure(args.model, setup)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

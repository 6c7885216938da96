"""The HF PEFT + accelerate side of benchmarks/engines.py: LoRA on SmolLM2 under DDP, DeepSpeed ZeRO-2/3 or
FSDP2 on CPU, written as a peft user writes it (transformers + peft + accelerate, no petune model code).

    python benchmarks/engines_peft.py --strategy ddp --batch-size 4 --output OUT          # one process
    accelerate launch --multi_gpu --num_machines 1 --num_processes 2 --num_cpu_threads_per_process 1 \\
        --mixed_precision no --dynamo_backend no \\
        benchmarks/engines_peft.py --strategy zero3 --batch-size 2 --output OUT           # two processes

Same settings as `petune train --strategy S` (src/petune/train/strategy.py): the same DeepSpeed config (ZeRO
stage, micro-batch, clipping at 1.0, DeepSpeed's fp16/bf16 off, torch's AdamW allowed, ZeRO-3's gathering limits
from one decoder layer's size) or FSDP2 plugin (one
shard group per decoder layer, reshard after forward, sharded state dict), fp32, fused torch AdamW at lr 2e-3
with 3 warmup steps then cosine, LoRA r 8, alpha 16, dropout 0 on all linear layers, seed 0.

Data: petune's tokenised demo records (petune.train.data, max 128 tokens, loss on the completions), step s taking
records order[4s : 4s + 4] of petune train's seeded shuffle, process r its slice of them: both sides train on the
same tokens. The loss is the model's own `labels=` loss (a mean over this process's labelled tokens).

Writes OUT/metrics.jsonl (loss and tokens/s of every step, global-batch tokens over the step's wall time) and the
adapter in OUT (adapter_model.safetensors, HF PEFT format). `--save plain` saves as a peft user does without
gathering (`save_pretrained` on the main process); the default gathers the LoRA tensors first (ZeRO-3 and FSDP2
partition them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from peft import LoraConfig, get_peft_model
from torch.distributed.tensor import DTensor  # FSDP2's sharded parameters
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from petune.embedded import embedded_model_dir
from petune.train.data import collate, load_dataset
from petune.train.engines import frozen_bytes
from petune.train.strategy import zero3_gathering

LR, WARMUP, MAX_GRAD_NORM, SEED = 2e-3, 3, 1.0, 0  # petune train's defaults for LoRA
LORA = {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0}


def deepspeed_config(stage: int, micro_batch: int, world: int) -> dict[str, Any]:
    """The DeepSpeed config petune train makes for `--strategy zeroN` (no offload, no accumulation)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "gradient_clipping": MAX_GRAD_NORM,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, not DeepSpeed's compiled CPU Adam
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def make_accelerator(strategy: str, micro_batch: int) -> Accelerator:
    """accelerate's engine for `strategy`, in a gloo group of the launched processes.

    accelerate switches DeepSpeed and FSDP on only in GPU processes: on a CPU `Accelerator(cpu=True,
    fsdp_plugin=...)` runs plain DDP (DistributedType.MULTI_CPU) and `Accelerator(cpu=True, deepspeed_plugin=...)`
    no DeepSpeed. So the group is made first as a CPU one, then the engine is switched on, as petune does.
    """
    if strategy == "ddp":
        return Accelerator(cpu=True)
    state = PartialState(cpu=True)
    if strategy.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # before the model loads: ZeRO-3 builds it partitioned
        config = deepspeed_config(int(strategy[-1]), micro_batch, state.num_processes)
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    else:
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
        )
        accelerator = Accelerator(fsdp_plugin=fsdp)
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp
    expected = DistributedType.DEEPSPEED if strategy.startswith("zero") else DistributedType.FSDP
    if accelerator.distributed_type != expected:
        raise RuntimeError(f"accelerate set up {accelerator.distributed_type}, not {expected}")
    return accelerator


def adapter_tensors(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained LoRA tensors whole, on every process (a collective under ZeRO-3 and FSDP2)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):  # ZeRO-3 partitions them; ZeRO-2: no-op
            return {name: p.detach().clone() for name, p in named}
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in named}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["ddp", "zero2", "zero3", "fsdp"], default="ddp")
    parser.add_argument("--batch-size", type=int, default=4, help="records per process per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--model", help="an HF model folder (default: the embedded SmolLM2-135M-Instruct's)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--save", choices=["gathered", "plain"], default="gathered")
    args = parser.parse_args()

    accelerator = make_accelerator(args.strategy, args.batch_size)  # before the model: ZeRO-3 loads it partitioned
    world, rank = accelerator.num_processes, accelerator.process_index
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    folder = args.model or str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM"))
    train = load_dataset(tokenizer, None, None, 0.1, args.max_length, seed=SEED).train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED)).tolist()  # petune's epoch 0

    if args.strategy == "zero3":  # the gathering limits petune sets from one decoder layer's size (strategy.py)
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].update(zero3_gathering(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP, args.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    held, total = frozen_bytes(accelerator.unwrap_model(model))  # as `petune train` prints it: is the base sharded?
    print(f"process {rank}: frozen weights held {held / 1e6:.2f} MB of {total / 1e6:.2f} MB", flush=True)
    rows = []
    for step in range(args.steps):
        started = time.perf_counter()
        first = (step * world + rank) * args.batch_size
        batch = collate([train[i] for i in order[first : first + args.batch_size]], tokenizer.pad_token_id)
        loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)  # DeepSpeed clips in its step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        tokens = accelerator.reduce(batch["attention_mask"].sum().double(), "sum").item()
        loss_mean = accelerator.reduce(loss.detach().double(), "mean").item()
        rows.append({"step": step + 1, "loss": loss_mean, "tokens_per_s": tokens / (time.perf_counter() - started)})
        if accelerator.is_main_process:
            print(json.dumps(rows[-1]), flush=True)

    unwrapped = accelerator.unwrap_model(model)
    if args.save == "gathered":
        tensors = adapter_tensors(accelerator, unwrapped)
        if accelerator.is_main_process:
            unwrapped.save_pretrained(output, state_dict=tensors)
    elif accelerator.is_main_process:
        unwrapped.save_pretrained(output)
    if accelerator.is_main_process:
        (output / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        speed = statistics.median(row["tokens_per_s"] for row in rows[1:] or rows)
        print(f"{args.strategy} x {world}: {speed:.0f} tokens/s (median of the steps after the first)")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()

"""Time one training step of each prompt method against LoRA on the same model and batch.

Run: `python benchmarks/prompt_vs_lora_step.py` (about a minute on a 2-core CPU; `--batch 4 --tokens 256
--steps 10` for the numbers in BENCHMARKS.md, `--dtype bf16` for a bf16 base). It uses the embedded
SmolLM2-135M when available, else a random 4-layer Llama, and prints a table of median step times. A step is
forward + backward + AdamW update (petune train's, `petune.optim.adamw`) in training mode, with the loss
`petune train` uses (`--loss petune`: `petune.loss.causal_lm_loss`, logits only where a label is) or the
model's own (`--loss labels`: the forward's `labels=`, full logits, what a transformers Trainer does). The
prompt methods see `--virtual` more positions than LoRA does (that is what they are), so the table also shows
how many positions each step computed. `lora control` is a second, identical LoRA: its ratio shows the run's
noise.

Each method wraps its own copy of the base model and the methods take their steps in turn (round-robin), so
a machine whose load changes during the run slows every method alike.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
from timing import interleaved  # benchmarks/, on the path when this file runs as a script
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

import petune
from petune import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from petune.loss import causal_lm_loss
from petune.optim import adamw


def base_model(name: str) -> PreTrainedModel:
    if name == "smollm2":
        try:
            from petune.embedded import load_model_and_tokenizer

            return load_model_and_tokenizer()[0]
        except (ImportError, FileNotFoundError) as error:
            print(f"embedded model unavailable ({error}); using a random 4-layer Llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def configs(virtual: int) -> dict[str, Callable[[], Any]]:
    return {
        "lora (r=8 q/v)": lambda: LoraConfig(task_type="CAUSAL_LM", r=8),
        "lora control": lambda: LoraConfig(task_type="CAUSAL_LM", r=8),
        "prompt tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
        "p-tuning (MLP)": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
        "p-tuning (LSTM)": lambda: PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=virtual, encoder_reparameterization_type="LSTM"
        ),
        "prefix tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual),
        "prefix + projection": lambda: PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=virtual, prefix_projection=True
        ),
    }


def train_step(
    model: petune.PeftModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], loss: str
) -> None:
    """One forward + backward + optimizer step."""
    (causal_lm_loss(model, batch) if loss == "petune" else model(**batch).loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "llama4"], default="smollm2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--virtual", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--loss", choices=["petune", "labels"], default="petune")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the frozen model's dtype")
    parser.add_argument("--methods", help="comma-separated names from the table's first column (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = base_model(args.model).to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (args.batch, args.tokens))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    print(f"{type(model).__name__}, batch {args.batch} x {args.tokens} tokens, {args.virtual} virtual tokens")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, loss: {args.loss}, {args.dtype}")
    chosen = configs(args.virtual)
    if args.methods:
        names = [name.strip() for name in args.methods.split(",")]
        unknown = [name for name in names if name not in chosen]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {list(chosen)}")
        chosen = {name: make for name, make in chosen.items() if name in names or name == "lora (r=8 q/v)"}
    models, steps = {}, {}
    for name, make in chosen.items():
        models[name] = petune.get_peft_model(copy.deepcopy(model), make()).train()
        optimizer = adamw([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
        steps[name] = functools.partial(train_step, models[name], optimizer, batch, args.loss)
    times = interleaved(steps, args.steps, args.warmup)
    print(f"{'method':<22}{'median ms/step':>16}{'vs LoRA':>10}{'positions':>11}{'trainable':>12}")
    lora_ms = 1000 * statistics.median(next(iter(times.values())))
    for name, peft_model in models.items():
        milliseconds = 1000 * statistics.median(times[name])
        positions = args.tokens + (0 if name.startswith("lora") else args.virtual)
        trainable = peft_model.get_nb_trainable_parameters()[0]
        print(f"{name:<22}{milliseconds:>16.1f}{milliseconds / lora_ms:>10.2f}{positions:>11}{trainable:>12,}")


if __name__ == "__main__":
    main()

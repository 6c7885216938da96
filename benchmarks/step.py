"""One training-step measurement in this process: petune or HF PEFT, one method, one dtype.

Prints one JSON line: median step seconds (after one warm-up step), peak RSS of the process in MB and, on a
GPU, the peak of torch's GPU memory in MB. Run through `benchmarks/run.py`, which starts a fresh process per
measurement.

    python benchmarks/step.py --impl petune --method lora --dtype fp32
    python benchmarks/step.py --impl peft --method qlora --dtype bf16 --device cuda --shape llama-2-7b
    PETUNE_KERNELS=0 python benchmarks/step.py --impl petune --method lora --compile   # torch.compile, per layer
    python benchmarks/step.py --impl petune --method prefix --dtype bf16 --loop library   # model(**batch).loss
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from petune.memory import running_allocator
from petune.plan.measure import peak_mb as peak_rss_mb

# Issue 21's methods, each on the attention q/v projections where it takes targets (IA3 and LN tuning: their
# defaults), at the size `petune train` uses by default. BOFT with one butterfly factor: peft 0.21 uses one
# without its CUDA extension whatever the config says.
LAYER_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ia3": ("IA3Config", {}),
    "ln_tuning": ("LNTuningConfig", {}),
    "loha": ("LoHaConfig", {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "lokr": ("LoKrConfig", {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "vera": ("VeraConfig", {"r": 256, "target_modules": ["q_proj", "v_proj"]}),
    "hra": ("HRAConfig", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    "fourierft": ("FourierFTConfig", {"n_frequency": 1000, "scaling": 150.0, "target_modules": ["q_proj", "v_proj"]}),
    "oft": ("OFTConfig", {"oft_block_size": 32, "target_modules": ["q_proj", "v_proj"]}),
    "boft": ("BOFTConfig", {"boft_block_size": 8, "target_modules": ["q_proj", "v_proj"]}),
    "adalora": (
        "AdaLoraConfig",
        {"init_r": 12, "target_r": 8, "total_step": 1000, "target_modules": ["q_proj", "v_proj"]},
    ),
}
METHODS = ["lora", "lora_all", "dora", "prompt", "ptuning", "prefix", "qlora", *LAYER_METHODS]


def make_config(lib: Any, method: str) -> Any:
    """The same adapter config for petune and peft (they share the class names and fields)."""
    if method == "lora":
        return lib.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    if method in ("lora_all", "qlora"):
        r = 16 if method == "lora_all" else 8
        return lib.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules="all-linear")
    if method == "dora":
        return lib.LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True
        )
    if method == "prompt":
        return lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)
    if method == "ptuning":
        return lib.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, encoder_hidden_size=128)
    if method == "prefix":
        return lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)
    if method in LAYER_METHODS:
        class_name, kwargs = LAYER_METHODS[method]
        return getattr(lib, class_name)(task_type="CAUSAL_LM", **kwargs)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def load_base(method: str, dtype: torch.dtype, device: str = "cpu", shape: str | None = None) -> Any:
    """The embedded SmolLM2, or with `shape` random weights in the shape of a `petune plan` model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from petune.embedded import embedded_model_dir

    kwargs: dict[str, Any] = {"dtype": dtype}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
    if device != "cpu":
        kwargs["device_map"] = device
    if shape is None:
        return AutoModelForCausalLM.from_pretrained(embedded_model_dir(), **kwargs)
    if method != "qlora":  # made where it runs: no 13 GB file for a 7B shape
        return random_model(shape, device).to(dtype)
    with tempfile.TemporaryDirectory(prefix="petune-random-") as folder:  # removed once loaded (7B: 13 GB)
        save_random_model(shape, folder)
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def random_model(shape: str, device: str) -> Any:
    """A random bf16 Llama of a built-in `petune plan` shape (e.g. smollm2-135m, llama-2-7b) on `device`.

    For a machine without the embedded model (a GPU machine, which the 98 MB GGUF file cannot travel to): step
    times and memory depend on the shape, not on the weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from petune.plan.architectures import resolve_architecture

    arch = resolve_architecture(shape)
    config = LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        attention_bias=arch.attention_bias,
        tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=arch.max_position_embeddings,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bf16 where it runs: never whole in fp32 there
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)  # transformers' init: norms' weights 1, the rest N(0, 0.02)
    finally:
        torch.set_default_dtype(default)


def save_random_model(shape: str, folder: str) -> None:
    """`random_model(shape)` saved to `folder`: loading it as a file lets QLoRA quantise it."""
    random_model(shape, "cpu").save_pretrained(folder)


def wrapped(impl: str, method: str, model: Any) -> Any:
    """`model` with `method`'s adapter from petune or peft (the same config class names and fields), training."""
    if impl == "peft":
        import peft as lib
    else:
        import petune as lib  # type: ignore[no-redef]
    return lib.get_peft_model(model, make_config(lib, method)).train()


def training_step(
    impl: str, model: Any, batch_size: int = 4, seq_len: int = 256, loop: str = "petune"
) -> Callable[[], torch.Tensor]:
    """One forward + backward + AdamW step of the wrapped `model` on a fixed random batch (labels = inputs),
    returning the loss: petune's `causal_lm_loss` for petune, the model's own `labels=` loss for peft; with
    `loop="library"`, `model(**batch).loss` on both sides, as a user's own loop writes it. AdaLoRA: its
    orthogonality regulariser in the loss (peft's model adds it to its own loss) and `update_and_allocate` after
    every optimizer step, on both sides."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab, (batch_size, seq_len)).to(model.get_input_embeddings().weight.device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}

    allocates = hasattr(model, "update_and_allocate") and getattr(model.peft_config["default"], "total_step", None)
    steps_done = [0]

    def step() -> torch.Tensor:
        if impl == "petune" and loop == "petune":
            from petune.loss import causal_lm_loss

            loss = causal_lm_loss(model, batch)
            penalty = model.loss_penalty()
            loss = loss if penalty is None else loss + penalty
        else:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if allocates:
            model.update_and_allocate(steps_done[0])
            steps_done[0] += 1
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["petune", "peft"], required=True)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--checkpointing", action="store_true", help="gradient (activation) checkpointing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="measured steps, after one warm-up step")
    parser.add_argument(
        "--loop",
        choices=["petune", "library"],
        default="petune",
        help="petune's loss as `petune train` calls it, or `model(**batch, labels=...).loss` on both sides",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each decoder layer (with PETUNE_KERNELS=0: whole layers)"
    )
    parser.add_argument("--shape", help="random weights in this `petune plan` model's shape, not the embedded model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = load_base(args.method, dtype, args.device, args.shape)
    if args.checkpointing:
        from petune.train.methods import enable_checkpointing  # either transformers name, as `petune train`

        enable_checkpointing(model)
    model = wrapped(args.impl, args.method, model)
    if args.compile:  # one compiled graph shared by the identical layers; the first step pays for compiling
        for layer in model.get_base_model().model.layers:
            layer.compile()
    step = training_step(args.impl, model, args.batch_size, args.seq_len, args.loop)

    gpu = torch.device(args.device).type == "cuda"
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        loss = step()
        if gpu:
            torch.cuda.synchronize()  # the step has run, not just been queued
        times.append(time.perf_counter() - start)
    result = {
        "impl": args.impl,
        "method": args.method,
        "dtype": args.dtype,
        "checkpointing": args.checkpointing,
        "loop": args.loop,
        "device": args.device,
        "model": args.shape or "embedded SmolLM2-135M-Instruct",
        "step_s": statistics.median(times[1:]),
        "peak_rss_mb": peak_rss_mb(),
        "loss": loss.item(),
        "allocator": running_allocator(),
    }
    if gpu:
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()

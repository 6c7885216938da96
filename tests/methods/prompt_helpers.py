"""Tiny decoder models and shared checks for the prompt-method tests (prompt, P- and prefix tuning).

Every model is built from a config with a fixed seed, so two builds are identical: one can be wrapped by
petune and the other by HF PEFT. Llama and Qwen2 use grouped-query attention (4 heads, 2 key/value heads).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

VOCAB = 100
PAD = 0
VIRTUAL = 4
ARCHS = ("llama", "qwen2", "gpt2")
GQA_ARCHS = ("llama", "qwen2")

# The five variants the issue names, built the same way from petune or from peft (same names and fields).
VARIANTS: dict[str, Callable[..., Any]] = {
    "prompt": lambda lib, **kw: lib.PromptTuningConfig(num_virtual_tokens=VIRTUAL, **kw),
    "p_tuning_mlp": lambda lib, **kw: lib.PromptEncoderConfig(num_virtual_tokens=VIRTUAL, encoder_hidden_size=16, **kw),
    "p_tuning_lstm": lambda lib, **kw: lib.PromptEncoderConfig(
        num_virtual_tokens=VIRTUAL, encoder_reparameterization_type="LSTM", encoder_hidden_size=16, **kw
    ),
    "prefix": lambda lib, **kw: lib.PrefixTuningConfig(num_virtual_tokens=VIRTUAL, **kw),
    "prefix_projection": lambda lib, **kw: lib.PrefixTuningConfig(
        num_virtual_tokens=VIRTUAL, prefix_projection=True, encoder_hidden_size=16, **kw
    ),
}
REPARAMETERIZED = ("p_tuning_mlp", "p_tuning_lstm", "prefix_projection")  # an encoder beyond the saved tokens


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A 2-layer, width-32 config of `arch` (4 heads; 2 key/value heads for Llama and Qwen2), 64 positions."""
    common: dict[str, Any] = {"vocab_size": VOCAB, "pad_token_id": PAD, "num_labels": 3}
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **common)
    config_class = LlamaConfig if arch == "llama" else Qwen2Config
    settings: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        **overrides,
    }
    return config_class(**settings, **common)


def tiny_model(arch: str, task: str = "causal_lm", seed: int = 0, **config_kwargs: Any) -> PreTrainedModel:
    """A 2-layer fp32 `arch` model in eval mode whose weights depend only on `seed`."""
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM
    model: PreTrainedModel = auto.from_config(tiny_config(arch, **config_kwargs), dtype=torch.float32)
    return model.eval()


def wrap(lib: ModuleType, arch: str, variant: str, task: str = "CAUSAL_LM", seed: int = 1, **kw: Any) -> Any:
    """`lib.get_peft_model` (lib: petune or peft) on a fresh tiny model; the adapter's init depends on `seed`."""
    model = tiny_model(arch, "seq_cls" if task == "SEQ_CLS" else "causal_lm")
    config = VARIANTS[variant](lib, task_type=task, **kw)
    torch.manual_seed(seed)
    return lib.get_peft_model(model, config).eval()


def left_padded(lengths: tuple[int, ...] = (7, 4, 5), seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of rows with `lengths` real tokens, padded on the left to the longest."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[row, width - length :] = 1
    return input_ids, mask


def rows_of(input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens, without padding."""
    return [ids[m.bool()] for ids, m in zip(input_ids, mask, strict=True)]


def right_padded(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows padded on the right instead."""
    rows = rows_of(input_ids, mask)
    out = torch.full_like(input_ids, PAD)
    out_mask = torch.zeros_like(mask)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        out_mask[i, : len(row)] = 1
    return out, out_mask


def greedy_gap(model: Any, prompts: list[torch.Tensor], generated: torch.Tensor) -> float:
    """How far each generated token falls short of the argmax of a plain forward over its row.

    The reference for row i is `model(prompt_i + generated_i)` with no cache and no padding; the result is
    max over rows and steps of (largest logit - logit of the generated token): 0 when every token is the argmax.
    """
    worst = 0.0
    new = generated.shape[1]
    for prompt, tokens in zip(prompts, generated, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, tokens])[None]).logits[0, -new - 1 : -1]
        chosen = logits.gather(1, tokens[:, None])[:, 0]
        worst = max(worst, float((logits.max(-1).values - chosen).max()))
    return worst


def logits(model: Any, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**inputs).logits
    return out


def sgd_step(model: Any, input_ids: torch.Tensor, lr: float = 0.5) -> None:
    """One plain SGD step on the causal-LM loss of `input_ids` (deterministic: no momentum, no dropout)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=input_ids, labels=input_ids).loss
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            param -= lr * grad

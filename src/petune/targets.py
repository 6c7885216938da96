"""Which modules an adapter touches: HF PEFT's matching rules for `target_modules` and friends."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

# Used when `target_modules` is omitted: the attention query/value projections of common architectures
# (Hu et al. 2021, section 7.1: adapting W_q and W_v gives the best quality for a given budget).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
}

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt: `nn.Linear` (bitsandbytes' 4-bit layers included) or GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear | Conv1D)


def matches(patterns: str | Sequence[str], name: str) -> bool:
    """HF PEFT's rule: a string is a full-match regex; a list matches exactly or as a `.`-suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def is_module_to_save(names: Sequence[str], name: str) -> bool:
    """HF PEFT's rule for `modules_to_save`: the qualified name ends with one of `names`.

    There is no `.` boundary, so `"norm"` also picks `input_layernorm`; an adapter folder only loads the
    same in both libraries if both pick the same modules.
    """
    return any(name.endswith(n) for n in names)


def is_in_module_to_save(names: Sequence[str], name: str) -> bool:
    """True for a module to save or a module inside one: HF PEFT never puts an adapter there."""
    return any(re.match(rf"(^|.*\.){n}($|\..*)", name) for n in names)


def pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """The key of `rank_pattern` / `alpha_pattern` that applies to module `name`, if any."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The transformer-block index in a module name like `model.layers.3.self_attn.q_proj`."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct short names of the model's linear layers, to suggest as targets."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_linear(module)})


def output_layer_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head, which `all-linear` leaves alone."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def default_target_modules(model: nn.Module) -> list[str]:
    """The usual LoRA targets of this architecture, or an error telling the user to choose."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(
        f"target_modules is not set and petune has no default for model type {model_type!r}; "
        f"pass target_modules=[...] from the model's linear layers: {', '.join(linear_layer_names(model))} "
        f"(or target_modules='all-linear')"
    )

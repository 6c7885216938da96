"""`LoraConfig`: HF PEFT's fields and defaults for LoRA, rsLoRA and DoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from petune.config import PeftConfig, PeftType

InitLoraWeights = bool | Literal["gaussian", "pissa"] | str


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation (Hu et al. 2021): W x + (alpha / r) B A x, with A (r, in) and B (out, r).

    Args:
        r: the rank of the update (section 4.1).
        lora_alpha: the update is scaled by `lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA).
        lora_dropout: dropout on the input of the low-rank path.
        target_modules: modules to adapt. A string is a full-match regex over qualified names; a list
            matches a name exactly or as a `.`-suffix; `"all-linear"` is every linear layer but the
            output head. None picks the architecture's query/value projections.
        exclude_modules: modules never adapted, matched like `target_modules`.
        bias: `"none"`, `"all"` (train every bias) or `"lora_only"` (biases of adapted layers).
        fan_in_fan_out: the layer stores its weight as (in, out), like GPT-2's `Conv1D` (set for you).
        init_lora_weights: True: A Kaiming-uniform, B zero, so the model starts unchanged;
            `"gaussian"`: A ~ N(0, 1/r); False: both random (for tests); `"pissa"` (or
            `"pissa_niter_K"` for a fast randomised SVD): A and B from the top-r singular vectors of W,
            W replaced by the residual (Meng et al. 2024).
        use_rslora: scale by `lora_alpha / sqrt(r)` (Kalajdzievski 2023), stable across ranks.
        use_dora: weight-decomposed LoRA (Liu et al. 2024): a trained magnitude per output row times the
            normalised direction W + s B A.
        layers_to_transform: only adapt blocks with these indices (with a list `target_modules`).
        layers_pattern: the name of the block list, e.g. `"layers"` or `"h"`, for `layers_to_transform`.
        rank_pattern: per-module ranks, `{name pattern: r}`, overriding `r`.
        alpha_pattern: per-module alphas, `{name pattern: alpha}`, overriding `lora_alpha`.
        trainable_token_indices: also train these rows of the input embedding (a list of token ids), or of
            the named modules (`{"embed_tokens": [ids], ...}`), e.g. new tokens' rows; see
            `petune.methods.lora.trainable_tokens`.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: InitLoraWeights = True
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LORA
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init == "gaussian" or str(init).startswith("pissa")):
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r} is not supported; use True, False, 'gaussian', "
                f"'pissa' or 'pissa_niter_K'"
            )
        _check_token_indices(self.trainable_token_indices)
        if isinstance(self.target_modules, list | tuple | set):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ValueError("LoraConfig.layers_to_transform needs a list target_modules, not a regex")


def _check_token_indices(indices: object) -> None:
    """`trainable_token_indices` is None, a list of ids >= 0, or `{module name: [ids]}`."""
    if indices is None:
        return
    lists = list(indices.values()) if isinstance(indices, dict) else [indices]
    for ids in lists:
        if not isinstance(ids, list | tuple) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(
                "LoraConfig.trainable_token_indices must be a list of token ids (ints >= 0) or "
                f"{{module name: [ids]}}, got {indices!r}"
            )

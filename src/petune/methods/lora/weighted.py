"""`add_weighted_adapter`: a new LoRA adapter that combines existing ones, as HF PEFT 0.21 builds it.

The new adapter takes the first adapter's config with `r = lora_alpha = new rank` (scaling 1, each
source's own scaling folded into the combined tensors) and targets the union of the sources' targets.
Per layer, with w_i the user's weight and s_i adapter i's scaling:

- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` merge the A's and the B's separately
  (`task_merging.combine`), A_i weighted by sign(w_i s_i) sqrt|w_i s_i| and B_i by sqrt|w_i s_i|, so
  for `linear` B A ~ sum_i w_i s_i B_i A_i only approximately; all ranks must be equal.
- `cat` stacks them: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (sum of ranks, r_1 + r_2 + ...), B = [B_1 B_2 ...],
  so B A = sum_i w_i s_i B_i A_i exactly.
- `svd` and the `*_svd` rules merge the full updates s_i B_i A_i (out, in) and keep the top `svd_rank`
  singular directions: B = U S, A = V^T (optionally clamped at the `svd_clamp` quantile).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from petune.layers import ModulesToSave, adapter_layers
from petune.methods.lora.config import LoraConfig
from petune.methods.lora.layer import LoraAdapter, LoraLayer
from petune.methods.lora.task_merging import SignMethod, combine

if TYPE_CHECKING:
    from petune.peft_model import PeftModel

SAME_RANK_RULES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SVD_RULES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*SAME_RANK_RULES, "cat", *SVD_RULES)


def add_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
) -> None:
    """Add LoRA adapter `adapter_name` = `adapters` combined with `weights` by `combination_type`.

    Like HF PEFT, nothing happens if `adapter_name` exists already (petune warns), and a single source
    adapter is always combined `linear`ly. The new adapter is not activated: call `set_adapter`.
    """
    if adapter_name in model.peft_config:
        warnings.warn(f"adapter {adapter_name!r} exists already; add_weighted_adapter left it as it is", stacklevel=3)
        return
    configs = _source_configs(model, adapters, weights)
    rule = "linear" if len(adapters) == 1 else combination_type
    new_rank = _new_rank(rule, configs, svd_rank)
    new_config = dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_union_targets(configs),
        alpha_pattern={},
        rank_pattern={},
    )
    model.add_adapter(adapter_name, new_config)
    options = (svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)
    try:
        for layer_name, layer in adapter_layers(model.base_model):
            if isinstance(layer, LoraLayer) and adapter_name in layer.adapters:
                sources: list[tuple[LoraAdapter, float]] = [
                    (layer.adapters[a], w)  # type: ignore[misc]
                    for a, w in zip(adapters, weights, strict=True)
                    if a in layer.adapters
                ]
                target: LoraAdapter = layer.adapters[adapter_name]  # type: ignore[assignment]
                if sources:
                    _fill_layer(layer_name, target, sources, rule, new_rank, options)
    except Exception:
        model.delete_adapter(adapter_name)  # nothing half-built is left behind
        raise


def _source_configs(model: PeftModel, adapters: Sequence[str], weights: Sequence[float]) -> list[LoraConfig]:
    """The sources' LoRA configs, or a clear error for what cannot be combined."""
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter name in adapters=[...]")
    if len(adapters) != len(weights):
        raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    configs = []
    for name in adapters:
        if name not in model.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters: {', '.join(model.peft_config)}")
        config = model.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; {name!r} is {config.peft_type}")
        if config.use_dora:
            raise ValueError(f"add_weighted_adapter cannot combine DoRA adapters ({name!r} has use_dora=True)")
        configs.append(config)
    for _, layer in adapter_layers(model.base_model):
        if isinstance(layer, ModulesToSave) and sum(a in layer.adapters for a in adapters) > 1:
            raise ValueError(
                "cannot combine adapters that each train their own copy of a module (modules_to_save): "
                f"{[a for a in adapters if a in layer.adapters]}"
            )
    if len({type(c.target_modules) for c in configs}) > 1:
        raise ValueError("the adapters' target_modules mix a regex string with lists; give them the same kind")
    return configs


def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _new_rank(rule: str, configs: list[LoraConfig], svd_rank: int | None) -> int:
    ranks = [_max_rank(c) for c in configs]
    if rule in SAME_RANK_RULES:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination_type={rule!r} needs adapters of the same rank, got ranks {ranks}; "
                "use 'cat' or an '*_svd' combination for different ranks"
            )
        return ranks[0]
    if rule == "cat":
        return sum(ranks)
    if rule in SVD_RULES:
        return svd_rank or max(ranks)
    raise ValueError(f"unknown combination_type {rule!r}; choose one of {', '.join(COMBINATION_TYPES)}")


def _union_targets(configs: list[LoraConfig]) -> list[str] | str | None:
    if isinstance(configs[0].target_modules, str):
        return "|".join(f"({c.target_modules})" for c in configs)
    return sorted({name for c in configs for name in (c.target_modules or [])})


def _fill_layer(
    layer_name: str,
    target: LoraAdapter,
    sources: list[tuple[LoraAdapter, float]],
    rule: str,
    new_rank: int,
    options: tuple[float | None, bool, str | None, float | None, SignMethod],
) -> None:
    """Write the combined A (new_rank, in) and B (out, new_rank) of one layer into `target`."""
    svd_clamp, full_matrices, driver, density, sign_method = options
    if rule == "cat":
        lora_a = torch.cat([a.lora_A.weight * w * a.scaling for a, w in sources], dim=0)
        lora_b = torch.cat([a.lora_B.weight for a, _ in sources], dim=1)
        lora_a = torch.nn.functional.pad(lora_a, (0, 0, 0, new_rank - lora_a.shape[0]))
        lora_b = torch.nn.functional.pad(lora_b, (0, new_rank - lora_b.shape[1]))
    elif rule in SVD_RULES:
        deltas = [a.delta_weight() for a, _ in sources]
        scale = torch.tensor([w for _, w in sources], device=deltas[0].device)
        merged = combine(rule, deltas, scale, density, sign_method)
        lora_b, lora_a = _top_singular(merged, new_rank, svd_clamp, full_matrices, driver, layer_name)
    else:
        signed = [math.copysign(math.sqrt(abs(w * a.scaling)), w * a.scaling) for a, w in sources]
        device = sources[0][0].lora_A.weight.device
        scale_a = torch.tensor(signed, device=device)
        scale_b = torch.tensor([abs(s) for s in signed], device=device)
        lora_a = combine(rule, [a.lora_A.weight for a, _ in sources], scale_a, density, sign_method)
        lora_b = combine(rule, [a.lora_B.weight for a, _ in sources], scale_b, density, sign_method)
    with torch.no_grad():
        target.lora_A.weight.copy_(lora_a)
        target.lora_B.weight.copy_(lora_b)


def _top_singular(
    delta: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool, driver: str | None, layer_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors of `delta` (out, in): B = U_r S_r (out, r), A = V_r^T (r, in).

    With `clamp` (a quantile in [0, 1]), entries of both are clipped to +-the `clamp` quantile of all of them.
    """
    if rank > min(delta.shape):
        raise ValueError(f"svd_rank={rank} is larger than layer {layer_name}'s size {tuple(delta.shape)}; lower it")
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    lora_b = u[:, :rank] @ torch.diag(s[:rank])
    lora_a = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), clamp)
        lora_b = lora_b.clamp(-high, high)
        lora_a = lora_a.clamp(-high, high)
    return lora_b, lora_a

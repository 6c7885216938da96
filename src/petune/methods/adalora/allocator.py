"""AdaLoRA's budget: which singular values stay, by smoothed importance (Zhang et al. 2023, section 3.2-3.3)."""

from __future__ import annotations

import torch

from petune.methods.adalora.config import AdaLoraConfig
from petune.methods.adalora.layer import SVDAdapter

FACTORS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """Scores every (P column, lambda, Q row) triplet of one adapter and masks the lowest to fit the budget.

    `layers` maps a module name to its adapter. The budget is counted in triplets over all layers: init_r per
    layer at the start, target_r per layer at the end.
    """

    def __init__(self, layers: dict[str, SVDAdapter], config: AdaLoraConfig) -> None:
        self.layers = layers
        self.config = config
        self.initial_budget = sum(adapter.lora_A.shape[0] for adapter in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}  # smoothed |w dL/dw| (eq. 8)
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}  # smoothed |that - its average| (eq. 9)

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets kept, whether to mask now) at `step`: full for tinit steps, then a cubic decrease to the
        target until total_step - tfinal (eq. 12), masking every deltaT steps; the target after that."""
        config = self.config
        assert config.total_step is not None
        end = config.total_step - config.tfinal
        if step <= config.tinit:
            return self.initial_budget, False
        if step > end:
            return self.target_budget, True
        remaining = 1 - (step - config.tinit) / (end - config.tinit)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % config.deltaT == 0

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold this step's |w dL/dw| of every A, E, B entry into the moving averages (gradients still in place)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for module_name, adapter in self.layers.items():
            for factor in FACTORS:
                param: torch.Tensor = getattr(adapter, factor)
                if param.grad is None:
                    continue
                key = (module_name, factor)
                importance = (param * param.grad).abs()
                average = self.sensitivity.get(key, torch.zeros_like(param))
                spread = self.uncertainty.get(key, torch.zeros_like(param))
                average = beta1 * average + (1 - beta1) * importance
                self.sensitivity[key] = average
                self.uncertainty[key] = beta2 * spread + (1 - beta2) * (importance - average).abs()

    def triplet_scores(self, module_name: str) -> torch.Tensor:
        """(r,): each triplet's score, lambda_i's plus the mean over Q's row i and over P's column i (eq. 10)."""

        def score(factor: str) -> torch.Tensor:
            return self.sensitivity[(module_name, factor)] * self.uncertainty[(module_name, factor)]

        return score("lora_E").view(-1) + (score("lora_A").mean(dim=1) + score("lora_B").mean(dim=0))

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero every lambda whose triplet scores at or below the (initial - budget)-th lowest; the kept pattern."""
        scores = {name: self.triplet_scores(name) for name in self.layers}
        dropped = self.initial_budget - budget
        if dropped <= 0:
            return {f"{name}.lora_E": [True] * len(score) for name, score in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), dropped).values.item()
        pattern = {}
        for name, score in scores.items():
            kept = score > threshold
            self.layers[name].lora_E.masked_fill_(~kept.view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = kept.tolist()
        return pattern

    @torch.no_grad()
    def apply(self, pattern: dict[str, list[bool]]) -> None:
        """Zero the lambdas `pattern` drops (in the final phase, after each optimizer step)."""
        for name, adapter in self.layers.items():
            kept = torch.tensor(pattern[f"{name}.lora_E"], device=adapter.lora_E.device)
            adapter.lora_E.masked_fill_(~kept.view(-1, 1), 0.0)

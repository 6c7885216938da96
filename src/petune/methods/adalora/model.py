"""Attaching AdaLoRA: SVD-shaped adapters, the orthogonality regulariser in the loss, rank allocation by step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petune.config import PeftConfig
from petune.layers import adapter_layers
from petune.methods.adalora.allocator import RankAllocator
from petune.methods.adalora.config import AdaLoraConfig
from petune.methods.adalora.layer import AdaLoraLayer, SVDAdapter
from petune.methods.tuner import LayerTuner


class AdaLora(LayerTuner):
    """AdaLoRA on `nn.Linear` and `Conv1D` layers; one adapter of a model trains (HF PEFT's rule), others load
    with `inference_mode=True`."""

    config_class = AdaLoraConfig
    layer_class = AdaLoraLayer

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.trainable: str | None = None  # the adapter the allocator and the regulariser work on
        self.allocator: RankAllocator | None = None

    def add(self, name: str, config: PeftConfig) -> None:
        assert isinstance(config, AdaLoraConfig)
        if not config.inference_mode and self.trainable is not None:
            raise ValueError(
                f"AdaLoRA trains one adapter per model and {self.trainable!r} trains already; add {name!r} with "
                f"inference_mode=True"
            )
        super().add(name, config)
        if not config.inference_mode:
            self.trainable = name
            self.allocator = RankAllocator(self.adapters(name), config)

    def add_to_layer(self, layer: AdaLoraLayer, module_name: str, name: str, config: PeftConfig) -> None:
        assert isinstance(config, AdaLoraConfig)
        kept = (config.rank_pattern or {}).get(f"{module_name}.lora_E")
        layer.add(name, config.init_r if kept is None else sum(map(bool, kept)), config)

    def adapters(self, name: str) -> dict[str, SVDAdapter]:
        """Adapter `name`'s layers by module name."""
        return {
            module_name: layer.adapters[name]  # type: ignore[misc]
            for module_name, layer in adapter_layers(self.model)
            if isinstance(layer, AdaLoraLayer) and name in layer.adapters
        }

    def forward(
        self, name: str, config: PeftConfig, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The model's output; a loss it computed (labels given) gets the orthogonality regulariser added (HF PEFT
        adds it only under a task wrapper, a config with a `task_type`: its plain `PeftModel` skips the tuner's
        forward)."""
        outputs = super().forward(name, config, module, args, kwargs)
        loss = getattr(outputs, "loss", None)
        penalty = self.penalty()
        if isinstance(loss, torch.Tensor) and penalty is not None:
            outputs.loss = loss + penalty
        return outputs

    def penalty(self) -> torch.Tensor | None:
        """orth_reg_weight x the mean over the trained adapter's layers of ||Q Q^T - I||_F and ||P^T P - I||_F
        (section 3.1); None when no adapter trains."""
        if self.trainable is None or self.allocator is None:
            return None
        terms = []
        for adapter in self.adapters(self.trainable).values():
            for gram in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        if not terms:
            return None
        return self.allocator.config.orth_reg_weight * torch.stack(terms).mean()

    def update_and_allocate(self, global_step: int) -> None:
        """After `loss.backward()` and `optimizer.step()`, before `zero_grad()`: update the importance scores
        and mask the trained adapter's singular values to this step's budget (HF PEFT's
        `update_and_allocate`); the final allocation is kept in `rank_pattern` and re-applied every step."""
        if self.allocator is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (inference_mode=False)")
        allocator, config = self.allocator, self.allocator.config
        assert config.total_step is not None
        end = config.total_step - config.tfinal
        if global_step < end:
            allocator.update_scores()
            budget, mask_now = allocator.budget(global_step)
            if mask_now:
                config.rank_pattern = allocator.mask_to_budget(budget)
        elif global_step == end:
            config.rank_pattern = allocator.mask_to_budget(allocator.target_budget)
            allocator.reset()
        else:
            if config.rank_pattern is None:  # resumed after the final allocation: the zeroed lambdas say it
                config.rank_pattern = {
                    f"{n}.lora_E": (a.lora_E.view(-1) != 0).tolist() for n, a in allocator.layers.items()
                }
            allocator.apply(config.rank_pattern)

    def training_state(self) -> dict[str, Any]:
        """What the allocator carries between steps besides the trained tensors (its smoothed importance scores
        and the rank pattern so far): a checkpoint keeps it, so a resumed run masks as the uninterrupted one."""
        if self.allocator is None:
            return {}
        allocator = self.allocator
        return {
            "sensitivity": dict(allocator.sensitivity),
            "uncertainty": dict(allocator.uncertainty),
            "rank_pattern": allocator.config.rank_pattern,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        if self.allocator is None or not state:
            return
        self.allocator.sensitivity = dict(state["sensitivity"])
        self.allocator.uncertainty = dict(state["uncertainty"])
        self.allocator.config.rank_pattern = state["rank_pattern"]

    def to_file(self, name: str, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Only the kept triplets are saved: each layer's A rows, E entries and B columns that `rank_pattern`
        keeps (a layer already built at its kept rank is saved whole)."""
        assert isinstance(config, AdaLoraConfig)
        pattern = config.rank_pattern or {}
        out = {}
        for key, tensor in tensors.items():
            module_name, _, factor = key[len(self.file_prefix) :].rpartition(".")
            kept = pattern.get(f"{module_name}.lora_E")
            rank_dim = 1 if factor == "lora_B" else 0
            if factor in ("lora_A", "lora_E", "lora_B") and kept is not None and len(kept) == tensor.shape[rank_dim]:
                index = torch.tensor(kept, dtype=torch.bool, device=tensor.device)
                tensor = tensor[:, index] if rank_dim else tensor[index]
            out[key] = tensor
        return out

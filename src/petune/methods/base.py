"""The contract between `PeftModel` and a method: the few hooks where methods differ.

`PeftModel` owns what every method shares: the adapter registry, freezing, `modules_to_save`, the file
format and the mixed-batch routing of `AdapterLayer`s. A method only says how to attach itself and, for
prompt methods, how to change the inputs. Adding a method = one package + one line in `methods.METHODS`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petune.config import PeftConfig


class Method:
    """Default hooks: a method that only injects `AdapterLayer`s needs to override `add` alone.

    `model` is the frozen base model. Modules a method creates outside the base model (a prompt
    encoder) are returned by `add` and registered by `PeftModel` under `adapter_modules[name]`, so they
    train, move between devices and save like any other parameter.
    """

    config_class: type[PeftConfig] = PeftConfig
    # HF PEFT's file keys: `base_model.model.<module>` for tuners that change layers, `base_model.<module>` for
    # prompt methods (whose wrapper nests one level less), e.g. for a classifier head in `modules_to_save`.
    file_prefix = "base_model.model."

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def add(self, name: str, config: PeftConfig) -> nn.Module | None:
        """Attach adapter `name` to `self.model`; return a module owned outside the base model, if any."""
        raise NotImplementedError

    def state_dict(self, name: str, config: PeftConfig, module: nn.Module | None) -> dict[str, torch.Tensor]:
        """Tensors to save beyond the adapter layers' parameters, under HF PEFT's keys."""
        return {}

    def to_file(self, name: str, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter layers' tensors as written to the file (AdaLoRA leaves out pruned ranks); as they are."""
        return tensors

    def load_state_dict(
        self, name: str, config: PeftConfig, module: nn.Module | None, state_dict: dict[str, torch.Tensor]
    ) -> set[str]:
        """Load the tensors `state_dict` wrote; return the keys consumed."""
        return set()

    def forward(
        self, name: str, config: PeftConfig, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run the base model's forward with adapter `name` active: `prepare_inputs`, then the model."""
        args, kwargs = self.prepare_inputs(name, config, module, args, kwargs)
        return self.model(*args, **kwargs)

    def prepare_inputs(
        self,
        name: str,
        config: PeftConfig,
        module: nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Change a forward call's arguments (prompt methods prepend virtual tokens)."""
        return args, kwargs

    def generate(self, name: str, config: PeftConfig, module: nn.Module | None, kwargs: dict[str, Any]) -> torch.Tensor:
        """Generate with adapter `name` active."""
        return base_generate(self.model, kwargs)

    def penalty(self) -> torch.Tensor | None:
        """A term the training loss adds (AdaLoRA's orthogonality regulariser); None for most methods."""
        return None

    def merge(self, names: list[str], safe_merge: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be merged into the weights")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} adapters cannot be merged into the weights")

    def unload(self) -> None:
        """Undo what the method changed in the base model beyond its adapter layers (`PeftModel.unload`)."""

    @property
    def supports_mixed_batch(self) -> bool:
        """Whether rows of one batch may use different adapters (`adapter_names=[...]`)."""
        return False


def base_generate(model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """`model.generate(**kwargs)`, or a clear error for a model that cannot generate."""
    generate = getattr(model, "generate", None)
    if generate is None:
        raise TypeError(f"{type(model).__name__} has no generate(); it is not a generative model")
    output: torch.Tensor = generate(**kwargs)
    return output

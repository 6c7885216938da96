"""`hotswap_adapter`: replace a loaded LoRA adapter's weights with another adapter's, in place.

HF PEFT 0.21's `peft.utils.hotswap.hotswap_adapter`, for petune's `PeftModel`: the adapter keeps its name,
its layers and (when the new rank is not larger) its very tensors, so anything holding them (an optimizer,
a compiled graph, a serving loop) sees the new weights without the model being rebuilt. As in peft:

- the two configs must agree on `use_rslora`, `lora_dropout`, `alpha_pattern` and `use_dora`;
- the new adapter may not target a layer the old one does not (nothing is changed then);
- a layer the new adapter does not target gets zero A and B (it then adds nothing);
- each layer's scaling becomes the new config's alpha / r (or alpha / sqrt(r) with rsLoRA);
- a smaller rank is zero-padded into the existing tensors (B A is unchanged by the zero rows/columns);
  a larger rank replaces the tensors' storage (the `Parameter` objects stay, their data pointers change);
- the adapter's stored config is left as it was (peft does the same): save the new adapter's own folder,
  not the swapped model, if you need the new config on disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petune import io
from petune.config import PeftConfig
from petune.layers import adapter_layers
from petune.methods.lora import LoraAdapter, LoraConfig, LoraLayer
from petune.methods.tuner import per_module
from petune.peft_model import PeftModel

CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")


def hotswap_adapter(
    model: PeftModel, model_name_or_path: str | Path, adapter_name: str, torch_device: str | None = None, **kwargs: Any
) -> None:
    """Load the LoRA adapter folder `model_name_or_path` into `model`'s adapter `adapter_name`, in place.

    Args:
        model: a petune `PeftModel` holding LoRA adapter `adapter_name`.
        model_name_or_path: a local adapter folder (`subfolder=` inside it, as in `from_pretrained`).
        torch_device: where to read the tensors to (default: where the adapter's tensors are).
        kwargs: `subfolder`, `allow_pickle` (as `PeftModel.from_pretrained`).
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"hotswap_adapter needs a petune PeftModel, got {type(model).__name__}")
    model._check_exists(adapter_name)
    old_config = model.peft_config[adapter_name]
    directory = Path(model_name_or_path) / kwargs["subfolder"] if kwargs.get("subfolder") else Path(model_name_or_path)
    new_config = PeftConfig.from_pretrained(directory)
    check_hotswap_configs_compatible(old_config, new_config)
    if adapter_name in getattr(model, "_merged", []):
        raise ValueError(f"adapter {adapter_name!r} is merged into the weights; call unmerge_adapter() first")
    state_dict = io.load_tensors(directory, allow_pickle=kwargs.get("allow_pickle", False))
    params = {k: p for k, p in io.layer_parameters(model.base_model, adapter_name).items() if ".lora_" in k}
    new = {k: t.to(torch_device) if torch_device else t for k, t in state_dict.items() if ".lora_" in k}
    _check_keys_and_shapes(params, new, directory)
    assert isinstance(new_config, LoraConfig)
    with torch.no_grad():
        for key, param in params.items():
            _swap_tensor(param, new.get(key))
        _update_layers(model, adapter_name, new_config)


def check_hotswap_configs_compatible(old: PeftConfig, new: PeftConfig) -> None:
    """Refuse configs whose differences the swapped tensors cannot carry (peft's list of fields)."""
    if new.peft_type != old.peft_type:
        raise ValueError(f"cannot hot-swap a {new.peft_type} adapter into a {old.peft_type} adapter")
    if not isinstance(old, LoraConfig):
        raise ValueError(f"hot-swapping supports LoRA adapters only, not {old.peft_type}")
    for key in CONFIG_KEYS_TO_CHECK:
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            raise ValueError(
                f"cannot hot-swap: the new adapter has {key}={after!r} but the loaded one {key}={before!r}; "
                "load it with load_adapter() instead"
            )


def _check_keys_and_shapes(params: dict[str, nn.Parameter], new: dict[str, torch.Tensor], directory: Path) -> None:
    """Every new tensor needs a place (same layer and kind) of as many dims; checked before anything changes."""
    unexpected = sorted(set(new) - set(params))
    if unexpected:
        raise RuntimeError(
            f"cannot hot-swap {directory}: it has {len(unexpected)} tensors for layers the loaded adapter does not "
            f"adapt, e.g. {unexpected[:3]}; load it with load_adapter() instead"
        )
    for key, tensor in new.items():
        if tensor.dim() != params[key].dim():
            raise RuntimeError(f"cannot hot-swap {key}: shape {tuple(tensor.shape)} vs {tuple(params[key].shape)}")


def _swap_tensor(param: nn.Parameter, tensor: torch.Tensor | None) -> None:
    """Put `tensor` into `param`: zero when absent, zero-padded when smaller, new storage when larger."""
    if tensor is None:
        param.zero_()
        return
    tensor = tensor.to(param.device, param.dtype)
    if all(o >= n for o, n in zip(param.shape, tensor.shape, strict=True)):
        param.zero_()
        param[tuple(slice(0, n) for n in tensor.shape)].copy_(tensor)
    else:
        param.data = tensor.clone()


def _update_layers(model: PeftModel, adapter_name: str, config: LoraConfig) -> None:
    """Each layer's scaling from the new config (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    for module_name, layer in adapter_layers(model.base_model):
        if isinstance(layer, LoraLayer) and adapter_name in layer.adapters:
            adapter: LoraAdapter = layer.adapters[adapter_name]  # type: ignore[assignment]
            rank = per_module(config.rank_pattern, module_name, config.r)
            alpha = per_module(config.alpha_pattern, module_name, config.lora_alpha)
            adapter.scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
            adapter.r = adapter.lora_A.weight.shape[0]
            adapter.lora_A.out_features = adapter.lora_B.in_features = adapter.r

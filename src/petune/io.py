"""HF PEFT's adapter file format: key mapping, safetensors in and out, atomic writes.

A parameter `layers.0.q_proj.adapters.default.lora_A.weight` of the base model is saved as
`base_model.model.layers.0.q_proj.lora_A.weight`: the `base_model.model.` prefix HF PEFT's wrapper
nesting produces, the adapter name removed. The same rule covers DoRA's `lora_magnitude_vector` and
`modules_to_save` copies (`score.adapters.default.weight` -> `base_model.model.score.weight`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from petune.files import load_safetensors
from petune.layers import adapter_layers

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def layer_parameters(model: nn.Module, adapter_name: str, prefix: str = PREFIX) -> dict[str, nn.Parameter]:
    """Adapter `adapter_name`'s parameters inside the model's adapter layers, by file key (`prefix` + name)."""
    out: dict[str, nn.Parameter] = {}
    for layer_name, layer in adapter_layers(model):
        if adapter_name not in layer.adapters:
            continue
        for param_name, param in layer.adapters[adapter_name].named_parameters():
            out[f"{prefix}{layer_name}.{param_name}"] = param
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically: a temp file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage: give each tensor its own contiguous copy.
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(owned, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_tensors(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an adapter folder's weights; pickled `adapter_model.bin` only when `allow_pickle=True`."""
    safetensors_path = directory / WEIGHTS_NAME
    if safetensors_path.is_file():
        return load_safetensors(
            safetensors_path, "adapter weights", "copy the adapter folder again from where it was saved, or retrain it"
        )
    pickle_path = directory / PICKLE_WEIGHTS_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickle_path} is a pickle file, which can run arbitrary code when loaded; petune loads "
                f"safetensors only. If you trust its source, pass allow_pickle=True (it is then read with "
                f"torch.load(weights_only=True)), or convert it once to {WEIGHTS_NAME}."
            )
        state: dict[str, torch.Tensor] = torch.load(pickle_path, map_location="cpu", weights_only=True)
        return state
    raise FileNotFoundError(f"no adapter weights in {directory}: expected {safetensors_path}")


def copy_into(params: dict[str, nn.Parameter], state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Copy file tensors into parameters, checking that every one is there with the right shape."""
    missing = sorted(k for k in params if k not in state_dict)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the adapter file lacks {len(missing)} tensors the model expects: {shown}")
    for key, param in params.items():
        tensor = state_dict[key]
        if tensor.shape != param.shape:
            raise ValueError(
                f"tensor {key} has shape {tuple(tensor.shape)} in the adapter file but "
                f"{tuple(param.shape)} in the model: the adapter was made for a different base model"
            )
        with torch.no_grad():
            param.copy_(tensor)
    return set(params)

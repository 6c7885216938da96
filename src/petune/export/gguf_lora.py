"""A LoRA adapter as a llama.cpp adapter GGUF (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's ADAPTER).

The format (llama.cpp's `convert_lora_to_gguf.py` and its loader): `general.type = adapter`, `adapter.type =
lora`, one `adapter.lora.alpha` for the whole file, and for each adapted matrix `W` of the base GGUF two
tensors `<W's GGUF name>.lora_a` (r, in) and `.lora_b` (out, r). llama.cpp adds `alpha / r * B A x`, with
`r` read off each pair's shape. Where the adapter's own scale differs (rsLoRA's `alpha / sqrt(r)`,
`rank_pattern`, `alpha_pattern`), the difference is folded into B. B's rows get the same rotary
permutation as the base query/key weights, since `P (B A) = (P B) A`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gguf import GGUFType, GGUFWriter, Keys

from petune.config import PeftConfig
from petune.export.architectures import TensorNames, arch_name, architecture_of, permute_rotary
from petune.export.outtypes import Outtype, encode
from petune.files import load_safetensors
from petune.methods.tuner import per_module
from petune.train import UserError

PREFIX = "base_model.model."
MERGE_INSTEAD = "use --format gguf (the adapter merged into the base)"


def check_lora_exportable(config: PeftConfig) -> None:
    """A `UserError` when the adapter carries something the llama.cpp LoRA format has no place for."""
    if config.peft_type != "LORA":
        raise UserError(f"a GGUF LoRA holds only LoRA adapters, this one is {config.peft_type}; {MERGE_INSTEAD}")
    if getattr(config, "use_dora", False):
        raise UserError(f"a GGUF LoRA has no place for DoRA's magnitude vectors; {MERGE_INSTEAD}")
    if getattr(config, "lora_bias", False) or getattr(config, "bias", "none") != "none":
        raise UserError(f"a GGUF LoRA has no place for trained biases; {MERGE_INSTEAD}")
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        raise UserError(f"a GGUF LoRA has no place for fully trained modules or token rows; {MERGE_INSTEAD}")


def scale_of(config: Any, module_name: str, rank: int) -> float:
    """The factor this adapter multiplies `B A x` by in module `module_name`, as petune and HF PEFT apply it."""
    alpha = float(per_module(config.alpha_pattern, module_name, config.lora_alpha))
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def write_lora_gguf(folder: Path, config: Any, base_config: Any, outtype: Outtype, path: Path) -> int:
    """Write the LoRA adapter in `folder` (config `config`) for a base of config `base_config`; return the pairs."""
    check_lora_exportable(config)
    architecture = architecture_of(base_config)
    names = TensorNames(architecture, base_config)
    tensors = load_safetensors(folder / "adapter_model.safetensors", "adapter weights", "copy the adapter again")
    alpha = float(config.lora_alpha)
    writer = GGUFWriter(path, arch_name(architecture))
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
    pairs = 0
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module_name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        down, up = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()  # (r, in), (out, r)
        if down.ndim != 2:
            raise UserError(f"{module_name} is not a linear layer (a GGUF LoRA adapts matrices only); {MERGE_INSTEAD}")
        rank = down.shape[0]
        up = up * (scale_of(config, module_name, rank) / (alpha / rank))  # llama.cpp applies alpha / rank
        gguf_name = names.gguf_name(module_name + ".weight")
        heads = names.rotary_heads(gguf_name)
        if heads is not None:
            up = permute_rotary(up, heads)
        for suffix, factor in ((".lora_a", down), (".lora_b", up)):
            data, used = encode(factor.numpy(), outtype.matrices)
            writer.add_tensor(gguf_name + suffix, data, raw_dtype=used)
        pairs += 1
    if not pairs:
        raise UserError(f"{folder} holds no LoRA weights (lora_A/lora_B)")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pairs

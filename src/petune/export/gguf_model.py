"""A whole model (base, or base with an adapter merged) as one GGUF file llama.cpp and Ollama run."""

from __future__ import annotations

from pathlib import Path

from gguf import GGML_QUANT_VERSION, GGUFType, GGUFWriter
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from petune.export.architectures import (
    TensorNames,
    add_hyperparameters,
    arch_name,
    architecture_of,
    permute_rotary,
)
from petune.export.outtypes import Outtype, encode
from petune.export.vocab import add_tokenizer

VOCABULARY_TENSORS = ("token_embd.weight", "output.weight")


def write_model_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, outtype: Outtype, path: Path, name: str
) -> None:
    """Write `model`'s weights (in `outtype`), hyperparameters, tokenizer and chat template to `path`.

    A tied output matrix is not written: llama.cpp then uses `token_embd.weight` for it, as the model does.
    """
    config = model.config
    architecture = architecture_of(config)
    names = TensorNames(architecture, config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    writer = GGUFWriter(path, arch_name(architecture))
    writer.add_type(GGUFType.MODEL)
    writer.add_name(name)
    add_hyperparameters(writer, config)
    writer.add_file_type(outtype.file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, int(config.vocab_size))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.gguf_name(hf_name)
        values = tensor.detach().float()
        heads = names.rotary_heads(gguf_name)
        if heads is not None:
            values = permute_rotary(values, heads)
        kind = outtype.vocabulary if gguf_name in VOCABULARY_TENSORS else outtype.matrices
        data, used = encode(values.numpy(), kind)
        writer.add_tensor(gguf_name, data, raw_dtype=used)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

"""The `--outtype` choices: the GGUF tensor type of each weight, and what each costs.

Vectors (norms, biases) stay float32 in every outtype, as llama.cpp's own converter keeps them: they are a
tiny share of the bytes and the layers are sensitive to them. Quantised types store rows in blocks of 32
values; a matrix whose rows are not a multiple of 32 long is written as f16 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, quants

from petune.train import UserError

BLOCK = 32  # values per block of Q8_0 and Q4_0


@dataclass(frozen=True)
class Outtype:
    """One `--outtype`: the type of matrices, of the vocabulary matrices, and the file type recorded."""

    matrices: GGMLQuantizationType
    vocabulary: GGMLQuantizationType  # token_embd / output: kept at 8 bits when the rest is 4-bit
    file_type: LlamaFileType
    cost: str  # `--help`: size and held-out exact match of the demo model in llama.cpp (BENCHMARKS.md)


Q = GGMLQuantizationType
OUTTYPES = {
    "f32": Outtype(Q.F32, Q.F32, LlamaFileType.ALL_F32, "540 MB, exact"),
    "f16": Outtype(Q.F16, Q.F16, LlamaFileType.MOSTLY_F16, "271 MB, exact match 85%% as in transformers"),
    "bf16": Outtype(Q.BF16, Q.BF16, LlamaFileType.MOSTLY_BF16, "271 MB, coarser mantissa than f16"),
    "q8_0": Outtype(Q.Q8_0, Q.Q8_0, LlamaFileType.MOSTLY_Q8_0, "145 MB, 80%%"),
    "q4_0": Outtype(Q.Q4_0, Q.Q8_0, LlamaFileType.MOSTLY_Q4_0, "92 MB, 80%% (embeddings kept at q8_0)"),
}


def outtype_named(name: str, allowed: tuple[str, ...] = tuple(OUTTYPES)) -> Outtype:
    """The outtype called `name`; a `UserError` naming the choices when it is not one of `allowed`."""
    if name not in allowed:
        raise UserError(f"unknown --outtype {name!r} for this format; choose one of {', '.join(allowed)}")
    return OUTTYPES[name]


def encode(values: np.ndarray, kind: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """`values` (float32) in GGUF type `kind` (f16 where a quantised row does not fill whole blocks).

    Returns the array to write (for quantised types, bytes whose shape is the row layout gguf expects) and
    the type actually used.
    """
    if values.ndim < 2:
        kind = Q.F32
    elif kind in (Q.Q8_0, Q.Q4_0) and values.shape[-1] % BLOCK:
        kind = Q.F16
    return quants.quantize(np.ascontiguousarray(values, dtype=np.float32), kind), kind

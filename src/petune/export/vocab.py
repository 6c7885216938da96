"""The tokenizer and chat template as GGUF metadata, so llama.cpp and Ollama tokenise as transformers does.

Two kinds of tokenizer are written: byte-level BPE (`tokenizer.ggml.model = gpt2`: GPT-2, SmolLM2, Qwen2,
Llama 3) and Llama's sentencepiece-style BPE with byte fallback (`llama`, read by gguf's `LlamaHfVocab`).
llama.cpp also needs the name of the rule that splits text into words before BPE (`tokenizer.ggml.pre`);
petune reads it off the tokenizer's own pre-tokenizer and refuses one it does not recognise, rather than
export a model that tokenises differently.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType
from gguf.vocab import LlamaHfVocab
from transformers import PreTrainedTokenizerBase

from petune.train import UserError

# The word-splitting regexes of known byte-level BPE tokenizers, as their tokenizer.json spells them, and the
# name llama.cpp knows each by. Digits one by one (Qwen2) or in runs of up to three (Llama 3).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")
SPLIT_NAMES = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


def add_tokenizer(writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Write `tokenizer.ggml.*` (tokens, types, merges, special ids) and `tokenizer.chat_template`.

    `vocab_size` is the model's embedding rows; ids the tokenizer does not use are written as unused tokens.
    """
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        spec_path = Path(folder) / "tokenizer.json"
        if not spec_path.is_file():
            raise UserError("GGUF export needs a fast tokenizer (tokenizer.json); this model's has none")
        spec = json.loads(spec_path.read_text())
        model = spec.get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            _add_llama_vocab(writer, Path(folder))
            merges = False
        elif model.get("type") == "BPE":
            _add_byte_level_vocab(writer, tokenizer, spec, vocab_size)
            merges = True
        else:
            raise UserError(f"petune cannot export a {model.get('type')!r} tokenizer to GGUF (supported: BPE)")
        special = SpecialVocab(folder, load_merges=merges, n_vocab=vocab_size)
    special.add_special_token = {"bos": _adds(tokenizer, "bos"), "eos": _adds(tokenizer, "eos")}
    template = getattr(tokenizer, "chat_template", None)
    special.chat_template = template if isinstance(template, str) else None
    special.add_to_gguf(writer, quiet=True)


def _adds(tokenizer: PreTrainedTokenizerBase, which: str) -> bool:
    """Whether the tokenizer puts its bos (or eos) token around a text by itself."""
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if which == "bos" else -1] == token_id


def _add_byte_level_vocab(
    writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any], vocab_size: int
) -> None:
    """GPT-2 style: every token as its byte-level string; added tokens marked control or user-defined."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _add_llama_vocab(writer: GGUFWriter, folder: Path) -> None:
    """Llama 1/2 and Mistral style (sentencepiece pieces with byte fallback), through gguf's reader."""
    vocab = LlamaHfVocab(folder)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's word splitting, from tokenizer.json's `pre_tokenizer`."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own regex; also what transformers rebuilds SmolLM2's tokenizer with
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex", ""))
        if name is not None:
            return name
    raise UserError(
        f"petune does not know how llama.cpp splits text for this tokenizer (pre-tokenizer {kinds}); "
        "use --format hf and llama.cpp's convert_hf_to_gguf.py"
    )

"""The Ollama `Modelfile` written beside a GGUF export (`ollama create NAME -f FILE`).

Ollama's templates are Go templates, not the Jinja of a Hugging Face chat template, so only a template
petune recognises is translated: ChatML (`<|im_start|>role ... <|im_end|>`, SmolLM2 and Qwen2). For any
other the TEMPLATE line is left out and Ollama falls back on the chat template stored in the GGUF file.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


def modelfile_text(model_file: str, tokenizer: PreTrainedTokenizerBase, adapter_file: str | None = None) -> str:
    """A Modelfile running `model_file` (with the LoRA `adapter_file`) with the tokenizer's chat format."""
    lines = [f"FROM {model_file}"]
    if adapter_file is not None:
        lines = [
            "# FROM: the base model as GGUF, exported with `petune export --model BASE --format gguf` (no --adapter)",
            *lines,
            f"ADAPTER {adapter_file}",
        ]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|im_start|>" in template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        system = default_system_message(tokenizer)
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append('PARAMETER stop "<|im_end|>"')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF file")
    if tokenizer.eos_token and tokenizer.eos_token != "<|im_end|>":
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


def default_system_message(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system message a ChatML template adds when the conversation has none (SmolLM2 has one)."""
    text = str(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False))
    match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, flags=re.DOTALL)
    return match.group(1) if match else None

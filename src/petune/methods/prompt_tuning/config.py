"""`PromptTuningConfig`: HF PEFT's fields and defaults for prompt tuning."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from petune.config import PeftType
from petune.methods.prompt_learning import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual tokens start (HF PEFT's values)."""

    RANDOM = "RANDOM"  # N(0, 1), as `nn.Embedding` initialises
    TEXT = "TEXT"  # the embeddings of `prompt_tuning_init_text`'s tokens, repeated or cut to V
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the embeddings of V tokens drawn uniformly from the vocabulary


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al. 2021): V trained embeddings put in front of the input embeddings.

    Args:
        prompt_tuning_init: `RANDOM`, `TEXT` or `SAMPLE_VOCAB` (section 2.2 of the paper compares them).
        prompt_tuning_init_text: the text whose token embeddings start the virtual tokens (`TEXT`).
        tokenizer_name_or_path: a local tokenizer folder for `TEXT` (a hub id works only where a hub is reachable).
        tokenizer_kwargs: extra arguments for `AutoTokenizer.from_pretrained` (`TEXT`).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PROMPT_TUNING
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            choices = ", ".join(i.value for i in PromptTuningInit)
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} is unknown; use {choices}") from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer folder)")
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text to start from)")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")

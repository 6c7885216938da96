"""Prompt tuning: a table of V virtual token embeddings, started at random, from text or from the vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from petune.methods.prompt_learning import PromptLearning, PromptLearningConfig, VirtualTokenEncoder
from petune.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit


class PromptEmbedding(VirtualTokenEncoder):
    """`embedding.weight` (V, hidden) is the virtual tokens themselves."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        assert config.num_virtual_tokens is not None and config.token_dim is not None
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        if config.inference_mode:  # the weights come from the adapter file
            return
        token_ids = initial_token_ids(config, word_embeddings.num_embeddings)
        if token_ids is not None:
            with torch.no_grad():
                weight = word_embeddings.weight[token_ids.to(word_embeddings.weight.device)]
                self.embedding.weight.copy_(weight.float())


def initial_token_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor | None:
    """The V token ids whose embeddings start the virtual tokens; None for `RANDOM`."""
    assert config.num_virtual_tokens is not None
    virtual = config.num_virtual_tokens
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, vocab_size, (virtual,))
    if config.prompt_tuning_init == PromptTuningInit.TEXT:
        ids = _tokenize(config)
        if not ids:
            raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens")
        repeated = ids * (virtual // len(ids) + 1)  # cycle through the text when it is shorter than V
        return torch.tensor(repeated[:virtual])
    return None


def _tokenize(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    path = config.tokenizer_name_or_path
    assert path is not None
    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run a tokenizer's own code
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as error:
        where = "a local folder" if Path(path).exists() else "not a local folder, and no hub could provide it"
        raise ValueError(f"tokenizer_name_or_path={path!r} ({where}) could not be loaded: {error}") from None
    ids: list[int] = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    return ids


class PromptTuning(PromptLearning):
    """Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"."""

    config_class = PromptTuningConfig

    def build_encoder(self, config: PromptLearningConfig) -> VirtualTokenEncoder:
        assert isinstance(config, PromptTuningConfig)
        word_embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
        return PromptEmbedding(config, word_embeddings)

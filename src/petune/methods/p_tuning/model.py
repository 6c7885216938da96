"""P-tuning: a trained table of V embeddings passed through an MLP or a bidirectional LSTM."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from petune.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from petune.methods.prompt_learning import PromptLearning, PromptLearningConfig, VirtualTokenEncoder


class PromptEncoder(VirtualTokenEncoder):
    """`embedding` (V, hidden) -> [`lstm_head`] -> `mlp_head` -> (V, hidden), with HF PEFT's module names."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        assert config.num_virtual_tokens is not None and config.token_dim is not None
        width = config.token_dim
        hidden = config.encoder_hidden_size or width
        self.embedding = nn.Embedding(config.num_virtual_tokens, width)
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=width,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("P-tuning's MLP always has 3 linear layers; encoder_num_layers is ignored", stacklevel=4)
            self.mlp_head = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width)
            )
        self.reparameterized = True

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embeddings = self.lstm_head(embeddings.unsqueeze(0))[0].squeeze(0)  # the V tokens as one sequence
        out: torch.Tensor = self.mlp_head(embeddings)
        return out


class PTuning(PromptLearning):
    """Liu et al. 2021, "GPT Understands, Too" (P-tuning)."""

    config_class = PromptEncoderConfig

    def build_encoder(self, config: PromptLearningConfig) -> VirtualTokenEncoder:
        assert isinstance(config, PromptEncoderConfig)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        return PromptEncoder(config)

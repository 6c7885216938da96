"""P-tuning: HF PEFT's encoder layout (MLP and LSTM), what is saved, and that training reaches the encoder."""

from __future__ import annotations

import peft
import pytest
import torch

import petune
from petune import PromptEncoderConfig
from tests.methods.prompt_helpers import VIRTUAL, logits, tiny_model, wrap

# peft 0.21 calls a transformers 5 deprecated name when wrapping a model
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize("variant", ["p_tuning_mlp", "p_tuning_lstm"])
def test_encoder_has_peft_parameter_names_and_shapes(variant: str) -> None:
    ours = wrap(petune, "llama", variant)
    theirs = wrap(peft, "llama", variant)
    ours_shapes = {
        name.removeprefix("adapter_modules.default."): param.shape
        for name, param in ours.named_parameters()
        if param.requires_grad
    }
    theirs_shapes = {
        name.removeprefix("prompt_encoder.default."): param.shape
        for name, param in theirs.named_parameters()
        if param.requires_grad
    }
    assert ours_shapes == theirs_shapes
    assert "mlp_head.4.weight" in ours_shapes or "lstm_head.weight_ih_l1" in ours_shapes


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="encoder_reparameterization_type='GRU' is unknown"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout"):
        PromptEncoderConfig(num_virtual_tokens=4, encoder_dropout=1.5)
    with pytest.warns(UserWarning, match="encoder_num_layers is ignored"):
        petune.get_peft_model(tiny_model("llama"), PromptEncoderConfig(num_virtual_tokens=4, encoder_num_layers=3))


def test_encoder_hidden_size_defaults_to_the_model_width() -> None:
    model = petune.get_peft_model(tiny_model("llama"), PromptEncoderConfig(num_virtual_tokens=4))
    assert model.peft_config["default"].encoder_hidden_size == 32
    assert model.adapter_modules["default"].mlp_head[0].weight.shape == (32, 32)


def test_virtual_tokens_are_the_encoders_output() -> None:
    model = wrap(petune, "qwen2", "p_tuning_lstm")
    encoder = model.adapter_modules["default"]
    input_ids = torch.randint(3, 100, (2, 5))
    prompts = encoder.mlp_head(encoder.lstm_head(encoder.embedding.weight[None])[0])
    embeds = torch.cat([prompts.expand(2, -1, -1), model.base_model.get_input_embeddings()(input_ids)], 1)
    expected = logits(tiny_model("qwen2"), inputs_embeds=embeds)
    assert torch.allclose(logits(model, input_ids=input_ids), expected, atol=1e-5)
    assert expected.shape[1] == VIRTUAL + 5


def test_saved_tokens_do_not_depend_on_dropout() -> None:
    """The LSTM's dropout is off when computing what is saved, even in training mode."""
    config = PromptEncoderConfig(
        num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.5
    )
    model = petune.get_peft_model(tiny_model("llama"), config).train()
    first = model.adapter_state_dict("default")["prompt_embeddings"]
    second = model.adapter_state_dict("default")["prompt_embeddings"]
    assert torch.equal(first, second)
    assert model.training


@pytest.mark.parametrize("variant", ["p_tuning_mlp", "p_tuning_lstm"])
def test_gradients_reach_every_encoder_parameter(variant: str) -> None:
    model = wrap(petune, "llama", variant).train()
    input_ids = torch.randint(3, 100, (2, 6))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, param in model.adapter_modules.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(param.grad is None for param in model.base_model.parameters())

"""Prompt tuning: config checks, the three initialisations, and what the forward pass does to the inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import petune
from petune import PromptTuningConfig
from tests.methods.prompt_helpers import VIRTUAL, left_padded, logits, right_padded, rows_of, tiny_model, wrap


def local_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer saved to `folder`: 'classify' -> 5, 'the' -> 7, 'review' -> 11."""
    vocab = {"[UNK]": 0, "classify": 5, "the": 7, "review": 11}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_text_init_needs_a_tokenizer_and_a_text() -> None:
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="/tmp")
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PromptTuningConfig()
    with pytest.raises(ValueError, match="task_type SEQ_2_SEQ_LM is not supported"):
        PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM")


def test_text_init_starts_from_the_texts_token_embeddings(tmp_path: Path) -> None:
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the review",
        tokenizer_name_or_path=str(local_tokenizer(tmp_path)),
    )
    model = petune.get_peft_model(tiny_model("llama"), config)
    words = model.base_model.get_input_embeddings().weight
    expected = words[torch.tensor([5, 7, 11, 5, 7])]  # the text's tokens, cycled to 5 virtual tokens
    assert torch.equal(model.adapter_modules["default"]().detach(), expected)


def test_text_init_with_a_missing_tokenizer_folder_says_so(tmp_path: Path) -> None:
    config = PromptTuningConfig(
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path=str(tmp_path / "nowhere"),
    )
    with pytest.raises(ValueError, match="tokenizer_name_or_path="):
        petune.get_peft_model(tiny_model("llama"), config)


def test_sample_vocab_init_starts_from_vocabulary_rows() -> None:
    config = PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB")
    model = petune.get_peft_model(tiny_model("llama"), config)
    words = model.base_model.get_input_embeddings().weight
    for row in model.adapter_modules["default"]().detach():
        assert (words == row).all(-1).any()


def test_virtual_tokens_prepend_and_labels_get_minus_100() -> None:
    """Logits keep the V virtual positions (as in HF PEFT); labels get V entries of -100 so the loss skips them."""
    model = wrap(petune, "llama", "prompt")
    input_ids, mask = left_padded((6, 6))
    out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
    assert out.logits.shape == (2, VIRTUAL + 6, 100)
    # every real token is predicted, the first one from the last virtual position (as in HF PEFT)
    shifted = out.logits[:, VIRTUAL - 1 : -1].reshape(-1, 100)
    expected = torch.nn.functional.cross_entropy(shifted, input_ids.reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    prompts = model.adapter_modules["default"]()
    embeds = model.base_model.get_input_embeddings()(input_ids)
    direct = tiny_model("llama")(inputs_embeds=torch.cat([prompts.expand(2, -1, -1), embeds], 1)).logits
    assert torch.allclose(out.logits, direct, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", ["prompt", "prefix"])
def test_left_and_right_padded_rows_equal_each_row_alone(arch: str, variant: str) -> None:
    model = wrap(petune, arch, variant)
    input_ids, mask = left_padded()
    skip = VIRTUAL if variant == "prompt" else 0  # prefix tuning's logits have no virtual positions
    alone = [logits(model, input_ids=row[None])[0, skip:] for row in rows_of(input_ids, mask)]
    left = logits(model, input_ids=input_ids, attention_mask=mask)[:, skip:]
    ids_right, mask_right = right_padded(input_ids, mask)
    right = logits(model, input_ids=ids_right, attention_mask=mask_right)[:, skip:]
    for row, expected in enumerate(alone):
        assert torch.allclose(left[row, left.shape[1] - len(expected) :], expected, atol=1e-5)
        assert torch.allclose(right[row, : len(expected)], expected, atol=1e-5)


def test_position_ids_are_used_not_dropped() -> None:
    """GPT-2's absolute positions: the caller's position_ids move after the virtual tokens (0..V-1)."""
    model = wrap(petune, "gpt2", "prompt")
    input_ids = torch.randint(3, 100, (2, 6))
    default = logits(model, input_ids=input_ids)
    assert torch.allclose(logits(model, input_ids=input_ids, position_ids=torch.arange(6)[None]), default, atol=1e-6)
    assert not torch.allclose(logits(model, input_ids=input_ids, position_ids=torch.arange(6)[None] + 3), default)


def test_input_longer_than_the_position_table_is_an_error_before_the_forward() -> None:
    model = wrap(petune, "gpt2", "prompt")
    calls = []
    model.base_model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"4 virtual tokens \+ 61 input tokens = 65 positions.*=64"):
        model(input_ids=torch.randint(3, 100, (1, 61)))
    assert calls == []
    model(input_ids=torch.randint(3, 100, (1, 60)))  # exactly fits
    assert calls


@pytest.mark.parametrize("variant", ["prompt", "p_tuning_mlp", "prefix"])
def test_seq_cls_reads_the_last_real_token_whatever_the_padding(variant: str) -> None:
    """Classifier heads find the last real token from input_ids; prompt methods pass embeddings, so petune
    moves right padding to the left first."""
    model = wrap(petune, "llama", variant, task="SEQ_CLS")
    input_ids, mask = left_padded()
    alone = torch.cat([logits(model, input_ids=row[None]) for row in rows_of(input_ids, mask)])
    assert torch.allclose(logits(model, input_ids=input_ids, attention_mask=mask), alone, atol=1e-5)
    ids_right, mask_right = right_padded(input_ids, mask)
    assert torch.allclose(logits(model, input_ids=ids_right, attention_mask=mask_right), alone, atol=1e-5)

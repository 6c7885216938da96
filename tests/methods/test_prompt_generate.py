"""`generate()` with a prompt method gives the tokens a plain forward pass over each row would choose.

The reference for every check is the petune model's own forward over one row: its real tokens only (no
padding) followed by what was generated, with no cache. HF PEFT 0.21 fails this for left-padded batches (its
positions ignore the padding) and, for prefix tuning, even without a cache.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import petune
from tests.methods.prompt_helpers import ARCHS, PAD, VARIANTS, greedy_gap, left_padded, logits, rows_of, wrap

NEW_TOKENS = 5
FLOAT_NOISE = 1e-4


def generate(model: petune.PeftModel, **kwargs: object) -> torch.Tensor:
    input_ids, mask = left_padded()
    with torch.no_grad():
        out: torch.Tensor = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, **kwargs
        )
    assert out.shape == (input_ids.shape[0], input_ids.shape[1] + NEW_TOKENS)
    return out[:, input_ids.shape[1] :]


def gap(model: petune.PeftModel, generated: torch.Tensor) -> float:
    return greedy_gap(model, rows_of(*left_padded()), generated)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_are_the_argmax_of_a_plain_forward(variant: str, arch: str, use_cache: bool) -> None:
    model = wrap(petune, arch, variant)
    generated = generate(model, do_sample=False, use_cache=use_cache)
    assert gap(model, generated) <= FLOAT_NOISE


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sampling_reads_the_same_logits(variant: str, arch: str) -> None:
    """Sampling with top_k=1 must pick the argmax; full sampling gives the same draw with and without a cache."""
    model = wrap(petune, arch, variant)
    assert gap(model, generate(model, do_sample=True, top_k=1)) <= FLOAT_NOISE
    draws = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        draws.append(generate(model, do_sample=True, temperature=1.5, use_cache=use_cache))
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_beam_search_on_a_padded_batch_equals_each_row_alone(variant: str, arch: str, use_cache: bool) -> None:
    model = wrap(petune, arch, variant)
    batched = generate(model, num_beams=3, do_sample=False, use_cache=use_cache)
    for row, prompt in enumerate(rows_of(*left_padded())):
        with torch.no_grad():
            alone = model.generate(
                input_ids=prompt[None], max_new_tokens=NEW_TOKENS, num_beams=3, use_cache=use_cache, pad_token_id=PAD
            )
        assert torch.equal(alone[0, len(prompt) :], batched[row])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoding_by_hand_through_forward_and_its_cache(variant: str) -> None:
    """A caller's own loop: forward(use_cache=True), then one token at a time with the returned cache."""
    model = wrap(petune, "llama", variant)
    input_ids, mask = left_padded()
    full = torch.cat([input_ids, torch.randint(3, 100, (input_ids.shape[0], 3))], dim=1)
    full_mask = torch.cat([mask, torch.ones(input_ids.shape[0], 3, dtype=mask.dtype)], dim=1)
    width = input_ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
        for step in range(width, full.shape[1]):
            out = model(input_ids=full[:, step : step + 1], attention_mask=full_mask[:, : step + 1], cache=out.cache)
    expected = logits(model, input_ids=full, attention_mask=full_mask)[:, -1]
    assert torch.allclose(out.logits[:, -1], expected, atol=1e-5)


def test_generate_refuses_to_run_past_the_position_table() -> None:
    """GPT-2's absolute positions end at n_positions: virtual + input + new tokens beyond it is an error first."""
    model = wrap(petune, "gpt2", "prompt")
    calls = []
    model.base_model.register_forward_pre_hook(lambda *args: calls.append(1))
    input_ids = torch.randint(3, 100, (1, 50))
    with pytest.raises(ValueError, match=r"4 virtual tokens \+ 70 input tokens = 74 positions.*=64"):
        model.generate(input_ids=input_ids, max_new_tokens=20)
    assert calls == []


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from petune.embedded import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer()
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


@pytest.mark.real_model
@pytest.mark.parametrize("variant", ["prompt_text", "p_tuning_mlp", "prefix_projection"])
def test_smollm2_greedy_tokens_are_the_argmax_of_a_plain_forward(smollm2: tuple[Any, Any], variant: str) -> None:
    """The embedded SmolLM2-135M (grouped-query attention: 9 heads, 3 key/value heads), left-padded batch."""
    base, tokenizer = smollm2
    if variant == "prompt_text":
        config = petune.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=6,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="Answer in one word:",
            tokenizer_name_or_path=tokenizer.name_or_path,
        )
    else:
        config = VARIANTS[variant](petune, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = petune.get_peft_model(base, config)
    try:
        batch = tokenizer(["The capital of France is", "Two plus two"], return_tensors="pt", padding=True)
        prompts = rows_of(batch["input_ids"], batch["attention_mask"])
        for use_cache in (True, False):
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=3, do_sample=False, use_cache=use_cache)
            worst = greedy_gap(model, prompts, out[:, batch["input_ids"].shape[1] :])
            assert worst <= 1e-3, (use_cache, worst)  # 30 layers of float32: allow a little more noise
    finally:
        model.unload()  # the module-scoped base model goes back unchanged for the next variant

"""Prompt tuning and P-tuning run their virtual tokens once per batch on a decoder, with the same results.

Two layouts: packed with the rows into one sequence (training steps, `use_cache=False`) and a batch of one in
front of the rows (other calls); both are checked against the per-row path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import petune
from petune.loss import causal_lm_loss
from petune.methods.prompt_learning import method as prompt_method
from petune.methods.prompt_learning.packed_pass import PACKED_ATTENTION, Packing, packed_attention
from tests.methods.prompt_helpers import ARCHS, VIRTUAL, left_padded, right_padded, tiny_model, wrap

SHARING = ("prompt", "p_tuning_mlp", "p_tuning_lstm")
LAYOUTS = ("packed", "shared")


def run(model: Any, per_row: bool, monkeypatch: pytest.MonkeyPatch, layout: str = "packed", **kwargs: Any) -> Any:
    """The model's output for `kwargs`: virtual tokens once per batch (packed where the call allows, or shared),
    or in front of every row."""
    with monkeypatch.context() as patch:
        if per_row:
            patch.setattr(prompt_method, "can_share_virtual_pass", lambda *args: False)
        if layout == "shared":
            patch.setattr(prompt_method, "can_pack", lambda *args: False)
        return model(**kwargs)


def training_without_dropout(model: Any) -> Any:
    """Training mode (checkpointing on where enabled) with GPT-2's dropout off, so two passes can be compared."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


def layer_inputs(model: Any, **kwargs: Any) -> list[tuple[int, ...]]:
    """The shapes of the hidden states entering the first decoder layer during one forward."""
    shapes: list[tuple[int, ...]] = []
    decoder = model.get_base_model().get_decoder()
    first_layer = (decoder.layers if hasattr(decoder, "layers") else decoder.h)[0]  # GPT-2 calls them h
    handle = first_layer.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        model(**kwargs)
    finally:
        handle.remove()
    return shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_virtual_tokens_go_through_the_layers_once_per_batch(arch: str) -> None:
    model = wrap(petune, arch, "prompt")
    input_ids, mask = left_padded()
    width = model.get_base_model().get_input_embeddings().weight.shape[1]
    assert layer_inputs(model, input_ids=input_ids, attention_mask=mask) == [
        (1, VIRTUAL, width),
        (*input_ids.shape, width),
    ]


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", SHARING)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_logits_loss_hidden_states_and_gradients_as_per_row(
    arch: str, variant: str, layout: str, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = training_without_dropout(wrap(petune, arch, variant))
    input_ids, mask = left_padded() if padded else left_padded((6, 6, 6))
    labels = input_ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "output_hidden_states": True}
    outputs, grads = [], []
    for per_row in (False, True):
        model.zero_grad()
        out = run(model, per_row, monkeypatch, layout, **batch)
        out.loss.backward()
        outputs.append(out)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    shared, reference = outputs
    assert shared.logits.shape == reference.logits.shape == (*input_ids.shape[:1], input_ids.shape[1] + VIRTUAL, 100)
    torch.testing.assert_close(shared.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.loss, reference.loss, atol=1e-6, rtol=1e-6)
    assert len(shared.hidden_states) == len(reference.hidden_states)
    for a, b in zip(shared.hidden_states, reference.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("layout", "reentrant"), [("packed", False), ("packed", True), ("shared", False)])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_and_checkpointing_match_the_per_row_loss(
    arch: str, layout: str, reentrant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = training_without_dropout(wrap(petune, arch, "p_tuning_mlp"))
    input_ids, mask = left_padded()
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}
    expected = run(model, True, monkeypatch, **batch).loss
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    with monkeypatch.context() as patch:
        if layout == "shared":
            patch.setattr(prompt_method, "can_pack", lambda *args: False)
        shapes = layer_inputs(model, **batch)
        loss = causal_lm_loss(model, batch)
    width = input_ids.shape[0] * input_ids.shape[1]
    assert shapes[0][:2] == ((1, VIRTUAL + width) if layout == "packed" else (1, VIRTUAL))
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for got, want in zip((p.grad for p in model.parameters() if p.requires_grad), expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_returned_cache_continues_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """use_cache=True: the cache holds the virtual and the caller's tokens; the next token's logits match."""
    model = wrap(petune, "llama", "prompt")
    input_ids, mask = left_padded()
    following = torch.randint(3, 100, (input_ids.shape[0], 1))
    full_ids, full_mask = torch.cat([input_ids, following], 1), torch.cat([mask, torch.ones_like(following)], 1)
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
        assert first.past_key_values.get_seq_length() == VIRTUAL + input_ids.shape[1]
        step = model(input_ids=following, attention_mask=full_mask, cache=first.past_key_values)
        whole = run(model, True, monkeypatch, input_ids=full_ids, attention_mask=full_mask)
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_logits_to_keep_reaching_into_the_virtual_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    model = wrap(petune, "qwen2", "prompt")
    input_ids, mask = left_padded()
    keep = input_ids.shape[1] + 2  # two virtual positions and every token
    with torch.no_grad():
        shared = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits
        reference = run(model, True, monkeypatch, input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(shared, reference[:, -keep:], atol=1e-5, rtol=1e-5)


def test_classifiers_and_reentrant_checkpointing_without_packing_keep_the_per_row_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    classifier = wrap(petune, "llama", "prompt", task="SEQ_CLS")
    input_ids, mask = left_padded()
    assert [shape[0] for shape in layer_inputs(classifier, input_ids=input_ids, attention_mask=mask)] == [3]
    model = wrap(petune, "llama", "prompt").train()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    monkeypatch.setattr(prompt_method, "can_pack", lambda *args: False)
    assert [shape[1] for shape in layer_inputs(model, input_ids=input_ids, attention_mask=mask)] == [
        VIRTUAL + input_ids.shape[1]
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_training_runs_virtual_tokens_and_rows_as_one_sequence(arch: str) -> None:
    model = wrap(petune, arch, "prompt").train()
    input_ids, mask = left_padded()
    width = model.get_base_model().get_input_embeddings().weight.shape[1]
    packed = [(1, VIRTUAL + input_ids.numel(), width)]
    assert layer_inputs(model, input_ids=input_ids, attention_mask=mask) == packed
    model.eval()  # evaluation packs too when it asks for no cache
    assert layer_inputs(model, input_ids=input_ids, attention_mask=mask, use_cache=False) == packed
    assert layer_inputs(model, input_ids=input_ids, attention_mask=mask) == [
        (1, VIRTUAL, width),
        (*input_ids.shape, width),
    ]


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_packed_right_padding_and_given_positions_match_per_row(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = training_without_dropout(wrap(petune, arch, "prompt"))
    input_ids, mask = right_padded(*left_padded())
    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1) + 2
    batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
    packed = run(model, False, monkeypatch, **batch).logits
    reference = run(model, True, monkeypatch, **batch).logits
    keep = torch.cat([torch.ones(mask.shape[0], VIRTUAL, dtype=torch.bool), mask.bool()], 1)
    torch.testing.assert_close(packed[keep], reference[keep], atol=1e-5, rtol=1e-5)


def test_sliding_window_attention_is_not_packed() -> None:
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=0)
    torch.manual_seed(1)
    model = petune.get_peft_model(
        model, petune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
    ).train()
    input_ids, mask = left_padded()
    assert [shape[0] for shape in layer_inputs(model, input_ids=input_ids, attention_mask=mask)] == [1, 3]


def test_packed_attention_refuses_what_it_does_not_implement() -> None:
    query = torch.zeros(1, 2, VIRTUAL + 3, 4)
    packing = Packing(VIRTUAL, 1, 3, None)
    with pytest.raises(ValueError, match="sliding_window"):
        packed_attention(torch.nn.Module(), query, query, query, None, petune_packing=packing, sliding_window=2)


def test_unload_gives_the_model_back_its_sdpa_attention() -> None:
    model = wrap(petune, "llama", "prompt").train()
    input_ids, mask = left_padded()
    model(input_ids=input_ids, attention_mask=mask)
    assert model.get_base_model().config._attn_implementation == PACKED_ATTENTION
    assert model.unload().config._attn_implementation == "sdpa"

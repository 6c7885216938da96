"""Packing without cross-talk: a packed row's loss and gradients are those of its examples run one by one."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from petune import LoraConfig, get_peft_model
from petune.kernels import attention
from petune.kernels.attention import BlockedCausalAttention, packed_segments
from petune.train.data import IGNORE_INDEX, Example, collate, pack
from petune.train.evaluate import token_loss_sum
from tests.conftest import PAD_TOKEN_ID, VOCAB_SIZE, build_tiny_model


def examples(count: int, seed: int = 0) -> list[Example]:
    """Examples of 3 to 14 tokens whose labels cover a random tail (a completion), as `tokenize` makes them."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = [rng.randrange(1, VOCAB_SIZE) for _ in range(rng.randrange(3, 15))]
        prompt = rng.randrange(0, len(ids) - 1)
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_pack_restarts_positions_and_drops_each_first_label() -> None:
    first, second = Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [8, 9])
    (row,) = pack([first, second], max_length=8)
    assert row.input_ids == [5, 6, 7, 8, 9]
    assert row.position_ids == [0, 1, 2, 0, 1]
    assert row.labels == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]  # 7 does not learn to predict 8
    batch = collate([row, Example([3], [3], [0])], PAD_TOKEN_ID)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]  # padding continues its row


def lora_model(dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a non-zero update, so every adapter weight has a gradient
            torch.nn.init.normal_(param, std=0.5)
    return model.to(dtype).train()


def loss_and_gradients(model: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Summed token loss over the batches and the LoRA weights' gradients."""
    model.zero_grad()
    total = sum(token_loss_sum(model, batch)[0] for batch in batches)
    assert isinstance(total, torch.Tensor)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def packed_and_one_by_one(dtype: torch.dtype) -> tuple[tuple[torch.Tensor, dict[str, Any]], ...]:
    data = examples(12)
    rows = pack(data, max_length=40)
    assert len(rows) < len(data) / 2  # several examples per row
    model = lora_model(dtype)
    one_by_one = loss_and_gradients(model, [collate([e], PAD_TOKEN_ID) for e in data])
    packed = loss_and_gradients(model, [collate(rows[:3], PAD_TOKEN_ID), collate(rows[3:], PAD_TOKEN_ID)])
    return packed, one_by_one


def test_packed_loss_and_gradients_equal_one_by_one_in_fp64() -> None:
    (loss, grads), (expected_loss, expected_grads) = packed_and_one_by_one(torch.float64)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_packed_rows_run_the_bf16_kernel_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = attention._blocked

    def counting(*args: Any) -> torch.Tensor:
        calls.append(args[-1] is not None)  # the packed rows' example indices were passed
        return real(*args)

    monkeypatch.setattr(attention, "_blocked", counting)
    (loss, grads), (expected_loss, expected_grads) = packed_and_one_by_one(torch.bfloat16)
    assert any(calls), "the packed rows went to SDPA, not the blocked kernel"
    torch.testing.assert_close(loss.float(), expected_loss.float(), rtol=2e-2, atol=0)
    for name, grad in expected_grads.items():
        cosine = F.cosine_similarity(grads[name].float().flatten(), grad.float().flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)


def test_kernel_with_segments_equals_sdpa_with_the_block_mask() -> None:
    torch.manual_seed(0)
    segments = torch.tensor([[0] * 30 + [1] * 50 + [2] * 70, [0] * 100 + [1] * 50])  # (B, T): blocks of 64 rows
    mask = (segments[:, :, None] == segments[:, None, :]) & torch.ones(150, 150, dtype=torch.bool).tril()
    assert torch.equal(packed_segments(mask[:, None], 2, 150), segments)
    assert packed_segments(mask[:, None].logical_not(), 2, 150) is None
    q, k, v = (torch.randn(2, heads, 150, 16, requires_grad=True) for heads in (4, 2, 2))

    def run(function: Any) -> list[torch.Tensor]:
        for tensor in (q, k, v):
            tensor.grad = None
        out = function()
        out.backward(torch.ones_like(out))
        return [out.detach(), *(t.grad for t in (q, k, v))]  # type: ignore[misc]

    got = run(lambda: BlockedCausalAttention.apply(q, k, v, 0.25, segments))
    want = run(lambda: F.scaled_dot_product_attention(q, k, v, mask[:, None], scale=0.25, enable_gqa=True))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

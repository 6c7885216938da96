"""Packing without cross-talk: a packed row's loss and gradients are those of its examples run one by one."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import masking_utils
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from petune import LoraConfig, get_peft_model
from petune.cli import main
from petune.kernels import attention
from petune.kernels.attention import BlockedCausalAttention, packed_segments
from petune.train import objective
from petune.train.data import IGNORE_INDEX, Example, collate, pack, pack_batch
from petune.train.evaluate import token_loss_sum
from tests.conftest import PAD_TOKEN_ID, VOCAB_SIZE, build_tiny_model
from tests.train.test_loop import assert_same_adapter
from tests.train.tiny import tiny_args


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


def test_pack_batch_fills_rows_first_fit_decreasing() -> None:
    batch = [Example(list(range(1, 1 + n)), list(range(1, 1 + n))) for n in (5, 3, 4, 2)]
    rows = pack_batch(batch, max_length=8)
    assert [row.position_ids for row in rows] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1]]  # 5+3, 4+2
    assert sorted(len(r.input_ids) for r in rows) == [6, 8]
    labelled = [sum(label != IGNORE_INDEX for label in row.labels) for row in rows]
    assert sum(labelled) == sum(n - 1 for n in (5, 3, 4, 2))  # every label a padded batch reads, none more


def test_a_padding_free_run_trains_the_padded_runs_adapter(
    tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`petune train`'s default puts each batch into shared rows; the adapter is the padded run's (fp32, 4 steps
    of 4 examples of ~40 tokens into rows of 128: within 1e-6, measured 4e-8)."""
    rows: list[int] = []

    def counting(examples: list[Example], max_length: int) -> list[Example]:
        packed = pack_batch(examples, max_length)
        rows.append(len(packed))
        return packed

    monkeypatch.setattr(objective, "pack_batch", counting)
    rows_of_128 = ["--max-length", "128"]
    assert main(tiny_args(tiny_model_dir, tiny_data, tmp_path / "free", *rows_of_128)) == 0
    assert rows and max(rows) < 4, rows  # fewer rows than examples: the batches were packed
    padded = tiny_args(tiny_model_dir, tiny_data, tmp_path / "padded", *rows_of_128, "--padding-free", "false")
    assert main(padded) == 0
    assert_same_adapter(tmp_path / "free", tmp_path / "padded", atol=1e-6)


def test_without_attention_that_keeps_examples_apart_batches_are_padded(
    tiny_model_dir: Path,
    tiny_data: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With masks that ignore restarting positions, examples in one row would attend to each other: the run pads
    its batches instead (and says so), and `--packing` is refused."""
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert main(tiny_args(tiny_model_dir, tiny_data, tmp_path / "run", "--max-steps", "1")) == 0
    assert (
        "padding-free batches off: llama's attention does not keep examples in one row apart" in capsys.readouterr().out
    )
    assert main(tiny_args(tiny_model_dir, tiny_data, tmp_path / "packed", "--max-steps", "1", "--packing", "true")) == 2
    assert (
        "--packing: llama's attention does not keep examples in one row apart; drop --packing"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_outside_the_kernel_run_sdpa_per_example(dtype: torch.dtype) -> None:
    """fp32 rows, and bf16 rows longer than the blocked kernel takes: SDPA over each example's span alone, with
    the output and gradients of SDPA over the whole row under the block-diagonal mask."""
    length = 40 if dtype == torch.float32 else attention.MAX_LENGTH + 40
    cut = length // 3
    segments = torch.tensor([[0] * cut + [1] * (length - cut), [0] * (length - 5) + [1] * 5])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, heads, length, 16, dtype=dtype, requires_grad=True) for heads in (4, 2, 2))
    grad = torch.randn(2, length, 4, 16, dtype=dtype)

    module = torch.nn.Module()
    module.num_key_value_groups = 2  # transformers' SDPA repeats keys and values from this

    def run(forward: Any) -> list[torch.Tensor]:
        for tensor in (q, k, v):
            tensor.grad = None
        out = forward(module, q, k, v, mask)[0]
        out.backward(grad)
        return [out.detach(), *(t.grad for t in (q, k, v))]  # type: ignore[misc]

    calls: list[int] = []
    real = attention._per_example

    def counting(*args: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "_per_example", counting)
        got = run(attention.sdpa_forward)
    assert calls, "the packed rows went to SDPA under the mask"
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for ours, theirs in zip(got, run(sdpa_attention_forward), strict=True):
        torch.testing.assert_close(ours, theirs, **tolerance)

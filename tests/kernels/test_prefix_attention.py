"""`petune.kernels.prefix_attention`: causal attention behind a prefix as two merged flash-attention calls."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import petune
from petune.kernels import attention, prefix_attention
from petune.kernels.prefix_attention import (
    MergedPrefixAttention,
    causal_attention_behind_prefix,
    merged_prefix_attention,
)
from tests.conftest import build_batch, build_tiny_model


def tensors(
    heads: int, kv_heads: int, virtual: int, length: int, dtype: torch.dtype, batch: int = 2, dim: int = 8
) -> list[torch.Tensor]:
    """query, the rows' own keys and values, the prefix keys and values; all requiring gradients."""
    torch.manual_seed(0)
    shapes = [
        (batch, heads, length, dim),
        *2 * [(batch, kv_heads, length, dim)],
        *2 * [(batch, kv_heads, virtual, dim)],
    ]
    return [(2 * torch.randn(shape)).to(dtype).requires_grad_() for shape in shapes]


def masked_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor, prefix_value: torch.Tensor
) -> torch.Tensor:
    """The definition: SDPA over [prefix; own] keys with an explicit mask (every prefix key, the own causally)."""
    virtual, length = prefix_key.shape[2], query.shape[2]
    mask = torch.ones(length, virtual + length, dtype=torch.bool).tril(virtual)
    keys, values = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
    return F.scaled_dot_product_attention(query, keys, values, mask, enable_gqa=query.shape[1] != key.shape[1])


def output_and_gradients(function: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    for tensor in inputs:
        tensor.grad = None
    out = function(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return [out.detach(), *(tensor.grad for tensor in inputs)]  # type: ignore[misc]


def merged(*inputs: torch.Tensor) -> torch.Tensor:
    return merged_prefix_attention(*inputs)  # SDPA's default scale: the flash calls' own


def behind(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    dropout: float = 0.0,
) -> torch.Tensor:
    """`causal_attention_behind_prefix` on the keys and values as prefix tuning's cache hands them: [prefix; own]."""
    keys, values = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
    return causal_attention_behind_prefix(query, keys, values, prefix_key.shape[2], dropout)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("virtual, length", [(1, 1), (3, 10), (16, 70)])  # 70: past the flash kernel's 64-row blocks
def test_output_and_all_gradients_equal_masked_sdpa(
    dtype: torch.dtype, tolerance: float, heads: int, kv_heads: int, virtual: int, length: int
) -> None:
    """Exact in fp64: the merge by log-sum-exps and each part's backward with the merged statistics."""
    inputs = tensors(heads, kv_heads, virtual, length, dtype)
    expected = output_and_gradients(masked_sdpa, inputs)
    for got, want in zip(output_and_gradients(merged, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_a_prefix_shared_by_the_rows_gets_their_summed_gradient() -> None:
    """The packed prompt pass hands one copy of the virtual keys expanded over the rows."""
    query, key, value, prefix_key, prefix_value = tensors(4, 2, 3, 9, torch.float64)
    shared_key, shared_value = (t[:1].detach().clone().requires_grad_() for t in (prefix_key, prefix_value))
    expanded = [shared_key.expand(2, -1, -1, -1), shared_value.expand(2, -1, -1, -1)]
    out = merged_prefix_attention(query, key, value, *expanded)
    repeated = [shared_key.repeat(2, 1, 1, 1), shared_value.repeat(2, 1, 1, 1)]
    torch.testing.assert_close(out, masked_sdpa(query, key, value, *repeated), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    got = [shared_key.grad, shared_value.grad]
    shared_key.grad = shared_value.grad = None
    masked_sdpa(query, key, value, *repeated).sum().backward()
    for grad, want in zip(got, [shared_key.grad, shared_value.grad], strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that run merged."""
    calls: list[int] = []
    real = MergedPrefixAttention.apply
    monkeypatch.setattr(MergedPrefixAttention, "apply", lambda *args: calls.append(1) or real(*args))
    return calls


def test_fp32_cpu_runs_merged_bf16_dropout_and_opt_out_do_not(
    merges: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merged where it applies; everywhere else zero queries through `causal_attention` (blocked in bf16
    training, SDPA otherwise), with the same result."""
    inputs = tensors(4, 2, 3, 9, torch.float32)
    expected = masked_sdpa(*inputs)
    torch.testing.assert_close(behind(*inputs), expected)
    assert len(merges) == 1
    monkeypatch.setenv("PETUNE_KERNELS", "0")
    torch.testing.assert_close(behind(*inputs), expected)
    monkeypatch.delenv("PETUNE_KERNELS")
    torch.manual_seed(0)
    dropped = behind(*inputs, dropout=0.5)
    assert dropped.shape == expected.shape and not torch.allclose(dropped, expected)
    assert len(merges) == 1
    blocked: list[int] = []
    real = attention.BlockedCausalAttention.apply
    monkeypatch.setattr(attention.BlockedCausalAttention, "apply", lambda *args: blocked.append(1) or real(*args))
    bf16 = [t.detach().bfloat16().requires_grad_() for t in inputs]
    torch.testing.assert_close(behind(*bf16).float(), expected, rtol=5e-2, atol=5e-2)
    assert (len(merges), len(blocked)) == (1, 1)
    monkeypatch.setattr(prefix_attention, "_FLASH_BACKWARD", None)  # a torch without the private flash ops
    torch.testing.assert_close(behind(*inputs), expected)
    assert len(merges) == 1


@pytest.mark.parametrize(
    "config",
    [
        petune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        petune.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16),
        petune.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    ],
    ids=["prompt", "p-tuning", "prefix"],
)
def test_fp32_training_steps_run_it_in_every_layer(
    config: Any, merges: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packed prompt pass and prefix tuning's unpadded rows: once per layer, the loss of the opt-out path."""
    batch = build_batch(pad=False, length=10)
    model = petune.get_peft_model(build_tiny_model("qwen2"), config).train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert len(merges) == model.config.num_hidden_layers
    monkeypatch.setenv("PETUNE_KERNELS", "0")
    torch.testing.assert_close(loss, model(**batch, labels=batch["input_ids"]).loss)
    assert len(merges) == model.config.num_hidden_layers


def test_keys_that_do_not_hold_the_prefix_and_the_rows_are_refused() -> None:
    query, key, value, *_ = tensors(4, 2, 3, 9, torch.float32)
    with pytest.raises(ValueError, match="expected 3 prefix keys before the 9 queries' own, got 9"):
        causal_attention_behind_prefix(query, key, value, 3)

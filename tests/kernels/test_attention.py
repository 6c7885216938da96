"""`petune.kernels.attention`: the blocked causal attention against SDPA, when it runs, and inside models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import petune
from petune import kernels
from petune.kernels import attention
from petune.kernels.attention import KERNEL_ATTENTION, BlockedCausalAttention, causal_attention, takes
from tests.conftest import build_batch, build_tiny_model


def qkv(
    heads: int, kv_heads: int, length: int, dtype: torch.dtype, batch: int = 2, dim: int = 16
) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    shapes = [(batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)]
    return tuple((2 * torch.randn(shape)).to(dtype).requires_grad_() for shape in shapes)


def attention_and_gradients(function: Any, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The output and the gradients of q, k, v for a fixed random output gradient."""
    for tensor in tensors:
        tensor.grad = None
    out = function(*tensors)
    torch.manual_seed(1)
    out.backward(torch.randn(out.shape).to(out.dtype))
    return [out.detach(), *(tensor.grad for tensor in tensors)]  # type: ignore[misc]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = BlockedCausalAttention.apply(q, k, v, q.shape[-1] ** -0.5)
    return out


@pytest.mark.parametrize("length", [2, 7, 64, 300])  # one block, several (BLOCK_ROWS = 64), uneven ends
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_the_same_attention_as_sdpa_in_fp32(heads: int, kv_heads: int, length: int) -> None:
    """In fp32 the blocked arithmetic is SDPA's to rounding: causal mask, blocks and GQA sums all checked."""
    tensors = qkv(heads, kv_heads, length, torch.float32)
    expected = attention_and_gradients(sdpa, tensors)
    for got, want in zip(attention_and_gradients(blocked, tensors), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", [9, 200])
def test_bf16_is_as_close_to_exact_as_sdpa(length: int) -> None:
    """bf16 inputs: output and gradients within bf16 rounding of the fp64 result, as SDPA's own bf16 ones are."""
    tensors = qkv(6, 2, length, torch.bfloat16)
    exact = attention_and_gradients(sdpa, tuple(t.detach().double().requires_grad_() for t in tensors))
    for function in (sdpa, blocked):
        for got, want in zip(attention_and_gradients(function, tensors), exact, strict=True):
            assert got.dtype == torch.bfloat16
            error = (got.double() - want).abs().max() / want.abs().max()
            assert error < 1.5e-2, f"{function.__name__}: {error:.3g}"  # 2 bf16 epsilons; measured <= 1e-2


def test_takes_only_cpu_bf16_training_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = qkv(4, 2, 16, torch.bfloat16)
    assert takes(q, k, v, 0.0)
    assert not takes(q, k, v, 0.1)  # dropout
    assert not takes(q.float(), k.float(), v.float(), 0.0)  # fp32: SDPA was as fast
    assert not takes(q, k[:, :, :8], v[:, :, :8], 0.0)  # keys not the queries' own positions
    assert not takes(q, k, v[..., :8], 0.0)  # values of another head size
    with torch.no_grad():
        assert not takes(q, k, v, 0.0)  # inference keeps nothing for backward: SDPA
    detached = [t.detach() for t in (q, k, v)]
    assert not takes(*detached, 0.0)
    monkeypatch.setattr(attention, "MAX_LENGTH", 15)
    assert not takes(q, k, v, 0.0)
    monkeypatch.setattr(attention, "MAX_LENGTH", 16)
    assert takes(q, k, v, 0.0)
    monkeypatch.setenv("PETUNE_KERNELS", "0")
    assert not takes(q, k, v, 0.0)


def count_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The query shapes the blocked kernel's forward sees from now on (in this test)."""
    calls: list[tuple[int, ...]] = []
    forward = BlockedCausalAttention.forward

    def counted(ctx: Any, query: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(tuple(query.shape))
        return forward(ctx, query, *args)

    monkeypatch.setattr(BlockedCausalAttention, "forward", staticmethod(counted))
    return calls


def lora_model(arch: str, kernels_on: bool, monkeypatch: pytest.MonkeyPatch) -> petune.PeftModel:
    monkeypatch.setenv("PETUNE_KERNELS", "1" if kernels_on else "0")
    model = build_tiny_model(arch).to(torch.bfloat16)
    torch.manual_seed(0)
    config = petune.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
    return petune.get_peft_model(model, config).train()


def lora_loss_and_gradients(
    model: petune.PeftModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_bf16_lora_step_takes_it_with_sdpas_loss_and_gradients(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = build_batch(pad=False, length=12)
    reference = lora_model(arch, kernels_on=False, monkeypatch=monkeypatch)
    assert reference.config._attn_implementation == "sdpa"
    expected_loss, expected = lora_loss_and_gradients(reference, batch)
    model = lora_model(arch, kernels_on=True, monkeypatch=monkeypatch)
    assert model.config._attn_implementation == KERNEL_ATTENTION
    calls = count_calls(monkeypatch)
    loss, grads = lora_loss_and_gradients(model, batch)
    layers = model.config.num_hidden_layers
    assert [shape[:3] for shape in calls] == [(2, model.config.num_attention_heads, 12)] * layers
    torch.testing.assert_close(loss, expected_loss, rtol=1e-2, atol=1e-2)
    assert grads.keys() == expected.keys() and grads
    for name, grad in expected.items():
        scale = grad.abs().max()
        torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=5e-2, atol=5e-2)


def test_padding_inference_and_fp32_stay_with_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    model = lora_model("llama", kernels_on=True, monkeypatch=monkeypatch)
    calls = count_calls(monkeypatch)
    model(**build_batch(pad=True), labels=build_batch()["input_ids"]).loss.backward()  # a padding mask
    with torch.no_grad():
        model(**build_batch(pad=False))
    model.generate(**build_batch(pad=False), max_new_tokens=3, do_sample=False)
    model.float()(**build_batch(pad=False)).logits.sum().backward()
    assert calls == []


def test_unload_switches_back_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    model = lora_model("llama", kernels_on=True, monkeypatch=monkeypatch)
    assert model.config._attn_implementation == KERNEL_ATTENTION
    assert model.unload().config._attn_implementation == "sdpa"
    model = lora_model("llama", kernels_on=True, monkeypatch=monkeypatch)
    kernels.disable(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "config",
    [
        petune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        petune.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    ],
    ids=["prompt-packed", "prefix"],
)
def test_prompt_methods_take_it_too(config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed prompt pass and causal attention behind a prefix: (B, heads, V + T, d) queries, all layers."""
    batch = build_batch(pad=False, length=10)
    model = petune.get_peft_model(build_tiny_model("qwen2").to(torch.bfloat16), config).train()
    calls = count_calls(monkeypatch)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert len(calls) == model.config.num_hidden_layers
    assert {shape[:3] for shape in calls} == {(2, model.config.num_attention_heads, 13)}
    monkeypatch.setenv("PETUNE_KERNELS", "0")  # the same step on SDPA
    model.zero_grad(set_to_none=True)
    expected = model(**batch, labels=batch["input_ids"]).loss
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)


def test_causal_attention_falls_back_to_sdpa() -> None:
    q, k, v = qkv(4, 2, 6, torch.float32)
    torch.testing.assert_close(causal_attention(q, k, v), sdpa(q, k, v))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_it_with_the_same_gradients(
    reentrant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpointed layers run it again in backward (reentrant: the first, gradient-free forward runs SDPA)."""
    batch = build_batch(pad=False, length=12)
    _, expected = lora_loss_and_gradients(lora_model("llama", kernels_on=True, monkeypatch=monkeypatch), batch)
    model = lora_model("llama", kernels_on=True, monkeypatch=monkeypatch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = count_calls(monkeypatch)
    _, grads = lora_loss_and_gradients(model, batch)
    layers = model.config.num_hidden_layers
    assert len(calls) == (1 if reentrant else 2) * layers  # reentrant: only the recomputation records gradients
    assert grads.keys() == expected.keys() and grads
    for name, grad in expected.items():
        scale = grad.abs().max()
        torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=5e-2, atol=5e-2)

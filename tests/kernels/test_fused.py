"""The kernels' compiled backward passes (petune.kernels.fused, PETUNE_COMPILE=1): the gradients of the stock
operations to rounding, compiled where they apply, the eager operations when compiling is off or fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from petune.kernels import RMSNormFunction, SwiGLUFunction, fused


@pytest.fixture(autouse=True)
def no_earlier_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_failed", [])
    monkeypatch.setenv("PETUNE_COMPILE", "1")


def stock_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm forward."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * x32.to(x.dtype)


def rms_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 24, 64)).to(dtype)
    weight = (1 + 0.1 * torch.randn(64)).to(dtype)
    return x, weight, torch.randn(2, 24, 64).to(dtype)


def gradient(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() for t in inputs]
    fn(*leaves).backward(grad)
    return [leaf.grad for leaf in leaves if leaf.grad is not None]


def close(ours: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    scale = reference.double().abs().max()
    torch.testing.assert_close(ours.double() / scale, reference.double() / scale, rtol=tolerance, atol=tolerance)


def test_rms_norm_gradient_is_compiled_and_matches_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = spy_compile(monkeypatch)
    x, weight, grad = rms_inputs(torch.bfloat16)
    ours = gradient(lambda t: RMSNormFunction.apply(t, weight, 1e-6, False), [x], grad)[0]
    assert compiled == ["rms_norm_input_gradient"] and ours.dtype == torch.bfloat16
    reference = gradient(lambda t: stock_rms_norm(t, weight.double()), [x.double()], grad.double())[0]
    stock = gradient(lambda t: stock_rms_norm(t, weight), [x], grad)[0]
    close(ours, reference, 1e-2)  # bf16's rounding of the result
    close(stock, reference, 1e-2)  # as close as autograd's own bf16 gradient
    eager = fused.rms_norm_input_gradient(grad, x, weight, torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6))
    close(ours, eager, 1e-2)


def test_swiglu_gradients_are_compiled_and_match_fp64(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = spy_compile(monkeypatch)
    torch.manual_seed(0)
    gate, up, grad = (torch.randn(2, 24, 96).to(torch.bfloat16) for _ in range(3))
    ours = gradient(lambda g, u: SwiGLUFunction.apply(g, u), [gate, up], grad)
    assert compiled == ["swiglu_gradients"]
    reference = gradient(lambda g, u: F.silu(g) * u, [gate.double(), up.double()], grad.double())
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.dtype == torch.bfloat16
        close(mine, theirs, 1e-2)


def spy_compile(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions compiled from now on (each `Fused` compiles again, as in a fresh process)."""
    names: list[str] = []
    compile_ = torch.compile

    def spied(fn: Any, *args: Any, **kwargs: Any) -> Any:
        names.append(fn.__name__)
        return compile_(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spied)
    for instance in (fused.fused_rms_norm_input_gradient, fused.fused_swiglu_gradients):
        monkeypatch.setattr(instance, "compiled", None)
    return names


@pytest.mark.parametrize("case", ["fp32", "not asked for", "switched off"])
def test_other_calls_run_the_eager_operations(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = spy_compile(monkeypatch)
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    if case == "not asked for":  # the default
        monkeypatch.delenv("PETUNE_COMPILE")
    if case == "switched off":
        monkeypatch.setenv("PETUNE_COMPILE", "0")
    x, weight, grad = rms_inputs(dtype)
    ours = gradient(lambda t: RMSNormFunction.apply(t, weight, 1e-6, False), [x], grad)[0]
    stock = gradient(lambda t: stock_rms_norm(t, weight), [x], grad)[0]
    close(ours, stock, 1e-5 if dtype == torch.float32 else 1e-2)
    gradient(lambda g, u: SwiGLUFunction.apply(g, u), [x, x.flip(-1)], grad)
    assert compiled == []


def test_a_failing_compiler_warns_once_and_runs_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(torch, "compile", broken)
    for instance in (fused.fused_rms_norm_input_gradient, fused.fused_swiglu_gradients):
        monkeypatch.setattr(instance, "compiled", None)
    x, weight, grad = rms_inputs(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found\\); running them uncompiled") as caught:
        ours = gradient(lambda t: RMSNormFunction.apply(t, weight, 1e-6, False), [x], grad)[0]
        gradient(lambda g, u: SwiGLUFunction.apply(g, u), [x, x.flip(-1)], grad)
    assert sum("petune:" in str(w.message) for w in caught) == 1 and not fused.enabled()
    close(ours, gradient(lambda t: stock_rms_norm(t, weight), [x], grad)[0], 1e-2)

"""The two autograd functions against the transformers modules they replace: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from petune.kernels import RMSNormFunction, SwiGLUFunction

HIDDEN, INTERMEDIATE = 48, 96


def stock_and_kernel_norm(
    dtype: torch.dtype, weight_dtype: torch.dtype, keep_output: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stock output, kernel output, stock input gradient, kernel input gradient) for one random input."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.requires_grad_(False)
    x = (3 * torch.randn(3, 7, HIDDEN)).to(dtype).requires_grad_()
    grad_y = torch.randn(3, 7, HIDDEN)
    stock = norm(x)
    (stock_grad,) = torch.autograd.grad(stock, x, grad_y.to(stock.dtype))
    kernel = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon, keep_output)
    (kernel_grad,) = torch.autograd.grad(kernel, x, grad_y.to(kernel.dtype))
    return stock, kernel, stock_grad, kernel_grad


@pytest.mark.parametrize("keep_output", [False, True])
def test_rms_norm_fp32_equals_transformers(keep_output: bool) -> None:
    stock, kernel, stock_grad, kernel_grad = stock_and_kernel_norm(torch.float32, torch.float32, keep_output)
    assert torch.equal(kernel, stock)  # the same operations in the same order
    torch.testing.assert_close(kernel_grad, stock_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_bf16_input_equals_transformers(weight_dtype: torch.dtype) -> None:
    """bf16 input, fp32 statistics: transformers rounds the normalised input to bf16 before the weight."""
    stock, kernel, stock_grad, kernel_grad = stock_and_kernel_norm(torch.bfloat16, weight_dtype, False)
    assert kernel.dtype == stock.dtype and torch.equal(kernel, stock)
    assert kernel_grad.dtype == torch.bfloat16
    torch.testing.assert_close(kernel_grad.float(), stock_grad.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_silu_times_up(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # op by op: the C kernel's bf16 backward (tests/kernels/test_native.py) equals this to rounding
    monkeypatch.setenv("PETUNE_NATIVE", "0")
    torch.manual_seed(0)
    gate = (2 * torch.randn(5, INTERMEDIATE)).to(dtype).requires_grad_()
    up = torch.randn(5, INTERMEDIATE).to(dtype).requires_grad_()
    grad = torch.randn(5, INTERMEDIATE).to(dtype)
    stock = F.silu(gate) * up
    stock_grads = torch.autograd.grad(stock, (gate, up), grad)
    kernel = SwiGLUFunction.apply(gate, up)
    kernel_grads = torch.autograd.grad(kernel, (gate, up), grad)
    assert torch.equal(kernel, stock)
    for mine, theirs in zip(kernel_grads, stock_grads, strict=True):
        assert torch.equal(mine, theirs)  # the same operations autograd runs, silu(gate) recomputed


def test_functions_keep_fewer_bytes() -> None:
    """SwiGLU keeps gate and up (not silu(gate)); RMSNorm on bf16 keeps the bf16 input, not an fp32 copy."""

    def kept_bytes(run: object) -> int:
        sizes: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run()  # type: ignore[operator]
        return sum(sizes.values())

    gate = torch.randn(64, INTERMEDIATE, requires_grad=True)
    up = torch.randn(64, INTERMEDIATE, requires_grad=True)
    assert kept_bytes(lambda: F.silu(gate) * up) == 3 * gate.nbytes
    assert kept_bytes(lambda: SwiGLUFunction.apply(gate, up)) == 2 * gate.nbytes

    norm = LlamaRMSNorm(HIDDEN).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(64, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    weight_bytes, rstd_bytes = norm.weight.nbytes, 64 * 4
    assert kept_bytes(lambda: norm(x)) == 2 * x.nbytes + rstd_bytes + weight_bytes  # fp32 copy of x
    assert (
        kept_bytes(lambda: RMSNormFunction.apply(x, norm.weight, 1e-6, False)) == x.nbytes + rstd_bytes + weight_bytes
    )

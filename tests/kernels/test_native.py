"""petune's C kernels (kernels/native.py): built here, equal to the op-by-op code to bf16 rounding, taken by the
RMSNorm, SwiGLU and loss code in bf16, and replaced by that code with a warning where no compiler works."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from petune.kernels import RMSNormFunction, SwiGLUFunction, native

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No library loaded or failed yet in this process, and an empty cache to build into."""
    monkeypatch.setenv("PETUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("PETUNE_NATIVE", raising=False)
    monkeypatch.setattr(native, "_failed", [])
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def rms_norm_grad(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_()
    RMSNormFunction.apply(x, weight, 1e-5, False).backward(grad)
    assert x.grad is not None
    return x.grad


@needs_compiler
def test_the_library_builds_once_into_the_cache(fresh_library: Path) -> None:
    assert native.library() is not None and native.enabled()
    built = list((fresh_library / "kernels").glob("native-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not built again
    assert [path.name for path in (fresh_library / "kernels").iterdir()] == [built[0].name]  # no leftovers


@needs_compiler
@pytest.mark.parametrize("shape", [(4, 33, 96), (1, 1, 8)])
def test_rms_norm_gradient_equals_op_by_op_to_rounding(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(shape)).bfloat16()
    weight = (2 * torch.rand(shape[-1])).bfloat16()
    grad = torch.randn(shape).bfloat16()
    exact = x.double().requires_grad_()
    (weight.double() * exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(grad.double())
    assert exact.grad is not None
    calls: list[int] = []
    original = native.rms_norm_input_gradient
    monkeypatch.setattr(native, "rms_norm_input_gradient", lambda *args: calls.append(1) or original(*args))
    mine = rms_norm_grad(x, weight, grad)
    monkeypatch.setenv("PETUNE_NATIVE", "0")
    op_by_op = rms_norm_grad(x, weight, grad)
    assert calls == [1] and mine.dtype == torch.bfloat16  # the C kernel ran once, the op-by-op code after it
    error = (mine.double() - exact.grad).abs().max()
    assert error <= 1.5 * (op_by_op.double() - exact.grad).abs().max() + 1e-6  # as close to exact as op by op
    torch.testing.assert_close(mine.float(), op_by_op.float(), rtol=1.6e-2, atol=1e-2)


@needs_compiler
@pytest.mark.parametrize("shape", [(4, 33, 96), (1, 1, 8)])
def test_rms_norm_forward_equals_transformers_to_rounding(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(shape)).bfloat16()
    weight = (2 * torch.rand(shape[-1])).bfloat16()
    y, rstd = native.rms_norm(x, weight, 1e-5)
    x32 = x.float()
    expected_rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = weight * (x32 * expected_rstd).bfloat16()  # transformers' LlamaRMSNorm, op by op
    assert y.dtype == torch.bfloat16 and rstd.dtype == torch.float32 and rstd.shape == (*shape[:-1], 1)
    torch.testing.assert_close(rstd, expected_rstd, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.float(), expected.float(), rtol=8e-3, atol=1e-6)  # at most a bf16 rounding apart
    assert (y != expected).float().mean() < 0.02  # and almost all bit for bit (4 in 589824 at 4 x 256 x 576)


@needs_compiler
def test_the_kernels_forward_passes_run_in_c(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16).bfloat16().requires_grad_()
    gate, up = torch.randn(2, 5, 16).bfloat16().requires_grad_(), torch.randn(2, 5, 16).bfloat16()
    calls: list[str] = []
    for name in ("rms_norm", "swiglu"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, o=original, n=name: calls.append(n) or o(*args))
    normed = RMSNormFunction.apply(x, torch.ones(16).bfloat16(), 1e-5, False)
    product = SwiGLUFunction.apply(gate, up)
    assert calls == ["rms_norm", "swiglu"]
    monkeypatch.setenv("PETUNE_NATIVE", "0")
    torch.testing.assert_close(RMSNormFunction.apply(x, torch.ones(16).bfloat16(), 1e-5, False), normed)
    op_by_op = SwiGLUFunction.apply(gate, up)
    torch.testing.assert_close(op_by_op, product, rtol=8e-3, atol=1e-6)  # torch's two roundings, to its exp
    assert calls == ["rms_norm", "swiglu"]


@needs_compiler
def test_swiglu_gradients_are_the_fp32_ones_rounded(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    gate = (3 * torch.randn(3, 50, 70)).bfloat16().requires_grad_()
    up = torch.randn(3, 50, 70).bfloat16().requires_grad_()
    grad = torch.randn(3, 50, 70).bfloat16()
    calls: list[int] = []
    original = native.swiglu_gradients
    monkeypatch.setattr(native, "swiglu_gradients", lambda *args: calls.append(1) or original(*args))
    grads = torch.autograd.grad(SwiGLUFunction.apply(gate, up), (gate, up), grad)
    assert calls == [1]
    gate32, up32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    exact = torch.autograd.grad(F.silu(gate32) * up32, (gate32, up32), grad.float())
    for mine, reference in zip(grads, exact, strict=True):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), reference, rtol=8e-3, atol=1e-5)  # one bf16 rounding
    monkeypatch.setenv("PETUNE_NATIVE", "0")
    op_by_op = torch.autograd.grad(SwiGLUFunction.apply(gate, up), (gate, up), grad)
    assert calls == [1]
    for mine, theirs in zip(grads, op_by_op, strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2, atol=1e-2)


@needs_compiler
def test_cross_entropy_equals_torchs_and_writes_the_gradient() -> None:
    torch.manual_seed(0)
    logits = (4 * torch.randn(37, 1000)).bfloat16()
    logits[3, 5] = 60.0  # one confident row: other probabilities far below the largest
    targets = torch.randint(0, 1000, (37,))
    targets[3] = 7
    reference = logits.float().requires_grad_()
    expected = F.cross_entropy(reference, targets, reduction="none")
    expected.sum().backward()
    assert reference.grad is not None
    written = logits.clone()
    losses = native.cross_entropy_(written, targets)
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(written, reference.grad.bfloat16(), rtol=8e-3, atol=1e-6)  # one bf16 rounding apart
    with pytest.raises(IndexError, match="outside the vocabulary of 1000"):
        native.cross_entropy_(logits.clone(), torch.full((37,), 1000))


@needs_compiler
def test_the_bf16_loss_takes_the_c_softmax_and_keeps_its_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from petune.loss import _FrozenHeadCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(40, 24).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(101, 24)).bfloat16()
    targets = torch.randint(0, 101, (40,))
    calls: list[int] = []
    original = native.cross_entropy_

    def counted(logits: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        calls.append(logits.shape[0])
        return original(logits, chunk_targets)

    monkeypatch.setattr(native, "cross_entropy_", counted)
    total = _FrozenHeadCrossEntropy.apply(hidden, weight, None, targets, 16)
    (grad,) = torch.autograd.grad(total, hidden)
    assert calls == [16, 16, 8]
    exact_hidden = hidden.detach().double().requires_grad_()
    exact = F.cross_entropy(exact_hidden @ weight.double().t(), targets, reduction="sum")
    (exact_grad,) = torch.autograd.grad(exact, exact_hidden)
    torch.testing.assert_close(total.double(), exact.detach(), rtol=2e-3, atol=0)  # bf16 logits, as op by op
    torch.testing.assert_close(grad.double(), exact_grad, rtol=3e-2, atol=3e-3)


def test_petune_native_0_runs_op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETUNE_NATIVE", "0")
    assert not native.enabled() and not native.applies(torch.zeros(2, dtype=torch.bfloat16))


def test_only_contiguous_bf16_cpu_tensors_qualify() -> None:
    plain = torch.zeros(4, 6, dtype=torch.bfloat16)
    assert not native.applies(plain.float())
    assert not native.applies(plain.t())
    assert not native.applies(plain, plain.half())


def test_a_failing_compiler_warns_once_and_the_op_by_op_code_runs(
    fresh_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "false")  # exits 1, as a broken compiler would
    torch.manual_seed(0)
    x, weight, grad = torch.randn(2, 5, 16).bfloat16(), torch.ones(16).bfloat16(), torch.randn(2, 5, 16).bfloat16()
    with pytest.warns(RuntimeWarning, match=r"building the C kernels failed \(RuntimeError: false exited 1"):
        result = rms_norm_grad(x, weight, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second call is silent
        again = rms_norm_grad(x, weight, grad)
    assert not native.enabled() and torch.equal(result, again)
    monkeypatch.setenv("PETUNE_NATIVE", "0")
    assert torch.equal(rms_norm_grad(x, weight, grad), result)  # the op-by-op result
    assert not list((fresh_library / "kernels").glob("*.so"))


def test_no_compiler_at_all_is_said_plainly(fresh_library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert native.library() is None
    assert not native.applies(torch.zeros(2, dtype=torch.bfloat16))

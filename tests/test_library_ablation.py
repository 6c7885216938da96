"""benchmarks/library_ablation.py: each variant changes what it says (and only while on), and the row-block
experiment multiplies as one product does, to rounding."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import library_ablation
from library_ablation import VARIANTS, apply

import petune
import petune.loss
from petune.kernels import RMSNormFunction, SwiGLUFunction, attention, native
from tests.conftest import build_tiny_model


def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of petune's kernels whose forward runs from now on."""
    calls: list[str] = []
    for function in (RMSNormFunction, SwiGLUFunction, attention.BlockedCausalAttention):

        def counted(ctx: Any, *args: Any, forward: Any = function.forward, name: str = function.__name__) -> Any:
            calls.append(name)
            return forward(ctx, *args)

        monkeypatch.setattr(function, "forward", staticmethod(counted))
    return calls


def train_once() -> None:
    model = build_tiny_model("llama").to(torch.bfloat16)
    config = petune.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    peft_model = petune.get_peft_model(model, config).train()
    input_ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()


@pytest.mark.parametrize(
    ("variant", "gone"),
    [("sdpa", "BlockedCausalAttention"), ("stock-rmsnorm", "RMSNormFunction"), ("stock-mlp", "SwiGLUFunction")],
)
def test_a_kernel_variant_runs_without_that_kernel_until_undone(
    variant: str, gone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = kernel_calls(monkeypatch)
    undo = apply(variant)
    try:
        train_once()
    finally:
        undo()
    assert gone not in calls and calls  # the other kernels still ran
    calls.clear()
    train_once()
    assert gone in calls


def test_every_variant_puts_back_what_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PETUNE_NATIVE", raising=False)

    def state() -> tuple[object, ...]:
        return attention.MAX_LENGTH, petune.loss.causal_lm_loss.__defaults__, F.linear, native.enabled()

    before = state()
    for variant in VARIANTS:
        apply(variant)()
    assert state() == before
    undo = apply("op-by-op")
    assert not native.enabled()
    undo()
    undo = apply("chunk-128")
    assert petune.loss.causal_lm_loss.__defaults__ == (128, None)
    undo()


def test_row_blocks_multiply_as_one_product(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library_ablation, "_PLANS", {})
    torch.manual_seed(0)
    a, b = torch.randn(515, 64, dtype=torch.bfloat16), torch.randn(64, 24, dtype=torch.bfloat16)
    expected = (a.float() @ b.float()).bfloat16()
    for blocks in (1, 2):
        torch.testing.assert_close(library_ablation._mm(a, b, blocks), expected, rtol=1e-2, atol=2e-2)
    weight = torch.randn(24, 64, dtype=torch.bfloat16)
    x = torch.randn(2, 260, 64, dtype=torch.bfloat16, requires_grad=True)
    undo = apply("row-blocks")
    try:
        out = F.linear(x, weight)
    finally:
        undo()
    assert len(library_ablation._PLANS) == 1  # 520 rows: the experiment ran and chose
    out.backward(torch.ones_like(out))
    assert x.grad is not None
    reference = x.detach().requires_grad_()
    F.linear(reference, weight).backward(torch.ones_like(out))
    assert reference.grad is not None
    torch.testing.assert_close(out, F.linear(x.detach(), weight), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-2, atol=2e-2)

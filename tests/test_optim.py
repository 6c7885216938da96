"""`petune.optim.adamw`: torch's fused AdamW where the kernel exists, the same updates as the per-tensor loop."""

from __future__ import annotations

import torch

from petune.optim import adamw


def test_cpu_parameters_get_the_fused_kernel_with_the_loops_results() -> None:
    torch.manual_seed(0)
    fused_params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    loop_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = adamw(fused_params, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(loop_params, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn_like(p) for p in fused_params]
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(fused_params, loop_params, strict=True):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the saved state loads into the per-tensor optimizer (a checkpoint resumes either way)
    loop.load_state_dict(fused.state_dict())


def test_a_device_without_the_kernel_gets_torchs_default() -> None:
    optimizer = adamw([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=1e-3)
    assert not optimizer.defaults["fused"]

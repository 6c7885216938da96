"""Timing that lets the machine's drift hit every contender alike: the calls take turns."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence

import torch


def interleaved(
    calls: dict[Hashable, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[Hashable, list[float]]:
    """Seconds of each call over `repeats` rounds in which every call runs once in turn, after `warmup` rounds
    that are not kept."""
    times: dict[Hashable, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def forward_backward(
    function: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], grad: torch.Tensor
) -> None:
    """One timed call of an attention benchmark: `function(*tensors)` and its backward from `grad`."""
    function(*tensors).backward(grad)

"""Devices for `petune plan`: named GPUs, a memory size, or this machine's CPU.

Sizes are in GiB (2^30 bytes), the unit nvidia-smi reports and the one "24 GB" or "80 GB" cards are sold in;
each is the total nvidia-smi shows for the card (e.g. 81920 MiB for an A100 80GB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from petune.plan.overhead import cpu_overhead
from petune.train import UserError

GIB = 2**30

# What a training process holds besides the step's own tensors.
#  cpu: measured on the machine and interpreter that plan (`petune.plan.overhead`): it depends on the install.
#  cuda: not measured here (no GPU): the CUDA context (0.3-0.6 GiB on recent cards), cuBLAS workspaces and
#       the caching allocator's rounding; 1 GiB is a planning figure, not a measurement.
CUDA_OVERHEAD_BYTES = 1 * GIB


@dataclass(frozen=True)
class Device:
    """Where the step runs: `kind` "cuda" or "cpu", `memory_bytes` it may use."""

    name: str
    kind: str
    memory_bytes: int
    overhead_bytes: int = CUDA_OVERHEAD_BYTES  # what the process holds besides the step's tensors


GPUS: dict[str, Device] = {
    d.name: d
    for d in [
        Device("rtx3090", "cuda", 24 * GIB),  # 24576 MiB
        Device("rtx4090", "cuda", 24 * GIB),  # 24564 MiB usable; 24 GiB on the box
        Device("a6000", "cuda", 48 * GIB),  # RTX A6000 48 GB: QLoRA's "single 48GB GPU"
        Device("a100-40gb", "cuda", 40 * GIB),  # 40960 MiB
        Device("a100-80gb", "cuda", 80 * GIB),  # 81920 MiB
        Device("h100", "cuda", 81559 * 2**20),  # H100 80GB (SXM): 81559 MiB
        Device("h200", "cuda", 143771 * 2**20),  # H200 141 GB: 143771 MiB
    ]
}
GPU_ALIASES = {
    "3090": "rtx3090",
    "4090": "rtx4090",
    "a100": "a100-80gb",
    "a100-80": "a100-80gb",
    "a100-40": "a100-40gb",
}
DEFAULT_GPU = "rtx4090"  # the brief's question: does it fit a 24 GB consumer card?


def named_device(name: str) -> Device:
    """A GPU from the table, or "cpu" (this machine's memory)."""
    key = name.lower().replace(" ", "").replace("_", "-")
    if key == "cpu":
        return this_cpu()
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise UserError(f"unknown GPU {name!r}; choose one of: {', '.join([*GPUS, 'cpu'])}, or give --gpu-memory GB")
    return GPUS[key]


def sized_device(gigabytes: float) -> Device:
    """A CUDA device with `gigabytes` GiB."""
    if gigabytes <= 0:
        raise UserError(f"--gpu-memory must be positive, got {gigabytes}")
    return Device(f"{gigabytes:g} GB GPU", "cuda", int(gigabytes * GIB))


def this_cpu() -> Device:
    """This machine's CPU, its physical memory (all of it; other processes are not subtracted), and the overhead
    of a training process measured with this interpreter (once; see `petune.plan.overhead`)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return Device("cpu", "cpu", int(memory), cpu_overhead().total_bytes)

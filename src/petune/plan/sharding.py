"""Per-device memory under `--strategy` across N devices: which components are partitioned, and what is
gathered whole for compute.

ZeRO (Rajbhandari et al. 2020, section 5 and figure 1), mixed-precision Adam, Ψ trained parameters, N devices:
16-bit weights 2Ψ, 16-bit gradients 2Ψ, fp32 master weights + two moments 12Ψ (K = 12):

    ddp     2Ψ + 2Ψ + 12Ψ       = 16Ψ        nothing partitioned
    stage 1 2Ψ + 2Ψ + 12Ψ/N     = 4Ψ + 12Ψ/N  optimizer state
    stage 2 2Ψ + (2Ψ + 12Ψ)/N   = 2Ψ + 14Ψ/N  optimizer state and gradients      (--strategy zero2)
    stage 3 (2Ψ + 2Ψ + 12Ψ)/N   = 16Ψ/N       and the parameters themselves    (--strategy zero3)

FSDP's full sharding (`fully_shard`, FSDP2) partitions the same three, so it plans as stage 3. With PEFT the
frozen base weights are parameters too: replicated under ddp and ZeRO-2, partitioned under ZeRO-3 and FSDP.
A partitioned model is gathered whole one piece at a time for compute; the plan counts the embedding and two
decoder layers (the one computing and the one prefetched) gathered at once, on top of the shards.
Activations, the loss and the framework overhead are per process and are not divided: each process runs its
own micro-batch. `--offload` moves state to CPU memory: `optimizer` the optimizer state (ZeRO-Offload),
`params` the parameters too (ZeRO-Infinity's CPU offload, FSDP's CPUOffloadPolicy), leaving only what is
gathered for compute on the device.
"""

from __future__ import annotations

import math

from petune.plan.architectures import Architecture
from petune.plan.counts import linear_shapes

STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
OFFLOADS = ("none", "optimizer", "params")
PARTITIONED = {
    "ddp": (),
    "zero2": ("gradients", "optimizer_state"),
    "zero3": ("frozen_weights", "trainable_weights", "gradients", "optimizer_state"),
    "fsdp": ("frozen_weights", "trainable_weights", "gradients", "optimizer_state"),
}
WEIGHTS = ("frozen_weights", "trainable_weights")


def check(strategy: str, nproc: int, offload: str) -> None:
    """The same rules as `petune train` (petune.train.strategy), as one-line errors."""
    from petune.train import UserError

    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    if offload not in OFFLOADS:
        raise UserError(f"--offload {offload!r} is unknown; choose one of: {', '.join(OFFLOADS)}")
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if offload != "none" and strategy == "ddp":
        raise UserError("--offload needs a sharding strategy: add --strategy zero2, zero3 or fsdp")
    if offload == "params" and strategy == "zero2":
        raise UserError("ZeRO-2 does not partition parameters, so it cannot offload them: use --strategy zero3")


def gathered_bytes(arch: Architecture, frozen_bytes: int, total_params: int) -> int:
    """Bytes of the parameters gathered whole at once under a partitioning strategy: the embedding and two
    decoder layers, at the frozen weights' bytes per parameter."""
    per_param = frozen_bytes / max(total_params, 1)
    layer = sum(i * o for i, o in linear_shapes(arch).values()) + 2 * arch.hidden_size
    return int(per_param * (arch.vocab_size * arch.hidden_size + 2 * layer))


def per_device(
    phase: dict[str, int], arch: Architecture, strategy: str, nproc: int, offload: str, total_params: int
) -> dict[str, int]:
    """One phase's components (bytes, as on one device) as each of `nproc` devices holds them."""
    shards = dict(phase)
    for name in PARTITIONED[strategy]:
        shards[name] = math.ceil(phase[name] / nproc)
    if offload in ("optimizer", "params"):
        shards["optimizer_state"] = 0
    if offload == "params":
        shards.update(frozen_weights=0, trainable_weights=0)
    if strategy in ("zero3", "fsdp"):  # the gathered pieces, less this device's own shard of them
        whole = phase["frozen_weights"] + phase["trainable_weights"]
        gathered = min(whole, gathered_bytes(arch, whole, total_params))
        shards["frozen_weights"] += gathered - (0 if offload == "params" else gathered // nproc)
        if strategy == "fsdp" and nproc > 1:
            # FSDP2 all-gathers a group's shards into one flat buffer of its whole size, then copies that into the
            # group's unsharded parameters (torch's `foreach_all_gather` / `foreach_all_gather_copy_out`): while a
            # group is gathered, both exist (ZeRO-3 gathers into the parameters' own storage)
            shards["frozen_weights"] += gathered
    return shards

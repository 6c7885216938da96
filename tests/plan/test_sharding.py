"""`petune plan --strategy ... --nproc N [--offload ...]`: memory per device, anchored to the ZeRO paper's
formulas (Rajbhandari et al. 2020, figure 1: mixed-precision Adam, K = 12) and to FSDP's full sharding."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from petune.cli import main
from petune.plan import ARCHITECTURES, Setup, plan
from petune.plan.gpus import named_device
from petune.plan.sharding import per_device

PSI = 7_000_000_000  # Ψ trained parameters
N = 8
STATE = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state")


def model_states(strategy: str, offload: str = "none") -> int:
    """Bytes of weights, gradients and optimizer state per device for full fine-tuning in bf16-mixed."""
    one_device = {"frozen_weights": 0, "trainable_weights": 2 * PSI, "gradients": 2 * PSI, "optimizer_state": 12 * PSI}
    arch = ARCHITECTURES["llama-2-7b"]
    shards = per_device({**one_device, "activations": 0}, arch, strategy, N, offload, total_params=PSI)
    gathered = shards["frozen_weights"]  # under zero3/fsdp: what is gathered whole for compute, beyond the shard
    return sum(shards[k] for k in STATE) - gathered


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("ddp", 16 * PSI), ("zero2", 2 * PSI + 14 * PSI // N), ("zero3", 16 * PSI // N), ("fsdp", 16 * PSI // N)],
)
def test_the_zero_paper_formulas(strategy: str, expected: int) -> None:
    assert model_states(strategy) == pytest.approx(expected, abs=4)


def test_offload_leaves_the_optimizer_state_or_everything_on_the_cpu() -> None:
    assert model_states("zero2", "optimizer") == 2 * PSI + 2 * PSI // N
    assert model_states("zero3", "params") == 2 * PSI // N  # only the gradients' shard stays


def test_a_7b_lora_per_device(capsys: pytest.CaptureFixture[str]) -> None:
    """The frozen base is divided by N under ZeRO-3 and FSDP (plus what is gathered for compute), not under
    ddp or ZeRO-2; activations stay per device; --json keeps total_gb and fits."""
    arch, device = ARCHITECTURES["llama-2-7b"], named_device("rtx4090")
    one = plan(arch, Setup(method="lora"), device)
    plans = {s: plan(arch, Setup(method="lora", strategy=s, nproc=N), device) for s in ("zero2", "zero3", "fsdp")}
    assert plans["zero2"].components["frozen_weights"] == one.components["frozen_weights"]
    for strategy in ("zero3", "fsdp"):
        frozen = plans[strategy].components["frozen_weights"]
        assert one.components["frozen_weights"] / N < frozen < one.components["frozen_weights"] / 2
        assert plans[strategy].sizes["activations"] == one.sizes["activations"]
    assert (
        main(["plan", "--model", "llama-2-7b", "--method", "full", "--strategy", "zero3", "--nproc", "8", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert {"total_gb", "fits"} <= result.keys() and (result["strategy"], result["nproc"]) == ("zero3", 8)
    full_ddp = plan(arch, Setup(method="full"), device)
    assert result["total_gb"] < full_ddp.total_bytes / 2**30 / 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "zero9"], "--strategy 'zero9' is unknown"),
        (["--strategy", "zero2", "--offload", "params"], "ZeRO-2 does not partition parameters"),
        (["--offload", "optimizer"], "--offload needs a sharding strategy"),
        (["--strategy", "fsdp", "--nproc", "0"], "--nproc must be at least 1"),
    ],
)
def test_bad_strategy_input(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-2-7b", *flags]) == 2
    assert message in capsys.readouterr().err


def test_one_process_of_a_strategy_holds_what_one_device_does() -> None:
    arch, device = ARCHITECTURES["llama-2-7b"], named_device("rtx4090")
    one = plan(arch, Setup(method="lora"), device)
    assert plan(arch, replace(Setup(method="lora"), strategy="zero2"), device).total_bytes == one.total_bytes
    assert plan(arch, Setup(method="lora", strategy="fsdp"), device).total_bytes == one.total_bytes


def test_fsdp_holds_the_all_gather_buffer_beside_the_unsharded_parameters() -> None:
    """FSDP2 all-gathers into a flat buffer and copies it into the unsharded parameters; ZeRO-3 gathers in place."""
    arch, device = ARCHITECTURES["smollm2-135m"], named_device("rtx4090")
    zero3, fsdp = (plan(arch, Setup(method="lora", strategy=s, nproc=2), device) for s in ("zero3", "fsdp"))
    one = plan(arch, Setup(method="lora"), device)
    whole = one.components["frozen_weights"] + one.components["trainable_weights"]
    from petune.plan.sharding import gathered_bytes

    gathered = gathered_bytes(arch, whole, one.total_params)
    assert fsdp.components["frozen_weights"] - zero3.components["frozen_weights"] == gathered


def test_deepspeed_is_in_a_cpu_process_of_zero2_and_zero3(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the plan adds what DeepSpeed's import and process group take (measured once per install)."""
    from petune.plan import memory, overhead

    monkeypatch.setattr(memory, "engine_overhead_bytes", lambda strategy: 123 * 2**20 if "zero" in strategy else 0)
    arch, cpu, gpu = ARCHITECTURES["smollm2-135m"], named_device("cpu"), named_device("rtx4090")
    for device, extra in ((cpu, 123 * 2**20), (gpu, 0)):
        ddp = plan(arch, Setup(method="lora", nproc=2), device).components["framework_overhead"]
        for strategy in ("zero2", "zero3"):
            assert (
                plan(arch, Setup(method="lora", strategy=strategy, nproc=2), device).components["framework_overhead"]
                == ddp + extra
            )
    assert overhead.engine_overhead_bytes("ddp") == overhead.engine_overhead_bytes("fsdp") == 0


def test_zero3_on_a_cpu_peaks_where_process_0_reads_the_whole_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers loads a ZeRO-3 model by reading the whole checkpoint in process 0, beside its shards: on a CPU
    that is the plan's peak when activations are small; on a GPU the checkpoint is in host memory, not counted."""
    from petune.plan import memory

    monkeypatch.setattr(memory, "engine_overhead_bytes", lambda strategy: 0)
    arch, cpu, gpu = ARCHITECTURES["smollm2-135m"], named_device("cpu"), named_device("rtx4090")
    setup = Setup(method="lora", strategy="zero3", nproc=2, batch_size=1, seq_len=16)
    loading = plan(arch, setup, cpu)
    one = plan(arch, Setup(method="lora", batch_size=1, seq_len=16), cpu)
    assert loading.peak_phase == "model load"
    shards = loading.components["frozen_weights"] - one.components["frozen_weights"]  # what it holds besides the file
    assert 0 < shards < one.components["frozen_weights"]
    assert plan(arch, setup, gpu).peak_phase != "model load"
    assert plan(arch, replace(setup, strategy="fsdp"), cpu).peak_phase != "model load"

"""`--strategy`: how the processes of a run share the model, built on accelerate's engines.

    ddp    every process holds the whole model; gradients are averaged (torch DistributedDataParallel)
    zero2  DeepSpeed ZeRO stage 2: optimizer state and gradients partitioned across the processes
    zero3  DeepSpeed ZeRO stage 3: parameters partitioned too, gathered layer by layer for compute
    fsdp   torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded per decoder layer

ZeRO comes from accelerate's `DeepSpeedPlugin` (a DeepSpeed config made from petune's flags, or the user's
own `--deepspeed CONFIG.json`, checked against the flags), FSDP2 from its `FullyShardedDataParallelPlugin`
with `fsdp_version=2`. petune shards nothing itself.

Precision is the one-device recipe on every engine: DeepSpeed's own fp16/bf16 modes (which cast the trained
tensors to 16 bits) stay off; the frozen base is loaded in bf16 under `--precision bf16`, the trained tensors
and their optimizer state stay fp32, and the forward runs under autocast.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from petune.train import UserError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    from petune.train.config import TrainConfig

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "params")
SHARDED = ("fsdp", "zero3")  # the parameters themselves are partitioned across the processes
# methods tested under the sharded engines (tests/train/test_engines.py); the others run under ddp
SHARDED_METHODS = ("full", "lora", "rslora", "dora", "qlora", "prompt", "ptuning", "prefix")
INSTALL = "pip install 'petune[deepspeed]'"


def is_deepspeed(strategy: str) -> bool:
    return strategy.startswith("zero")


def check(cfg: TrainConfig) -> None:
    """Refuse strategy, offload and DeepSpeed-config combinations that cannot run (one line each).

    With `--deepspeed` and the default strategy, the strategy is the config's ZeRO stage.
    """
    for name, allowed in (("strategy", STRATEGIES), ("offload", OFFLOADS)):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} {getattr(cfg, name)!r} is unknown; choose one of: {', '.join(allowed)}")
    if cfg.deepspeed is not None:
        _check_user_config(cfg, read_deepspeed(cfg.deepspeed))
    elif cfg.strategy == "ddp":  # `accelerate launch --config_file` with DeepSpeed or FSDP chosen there
        cfg.strategy = _from_accelerate_launch()
    if cfg.strategy == "ddp" and cfg.offload != "none":
        raise UserError("--offload needs a sharding strategy: add --strategy zero2, zero3 or fsdp")
    if cfg.strategy == "zero2" and cfg.offload == "params":
        raise UserError("ZeRO-2 does not partition parameters, so it cannot offload them: use --strategy zero3")
    if cfg.strategy == "fsdp" and cfg.offload == "optimizer":
        raise UserError("FSDP offloads parameters, gradients and optimizer state together: use --offload params")
    if cfg.strategy == "ddp":
        return
    if cfg.objective == "dpo":
        raise UserError(f"--objective dpo runs under --strategy ddp only, not {cfg.strategy}")
    if cfg.method not in SHARDED_METHODS:
        raise UserError(
            f"--method {cfg.method} runs under --strategy ddp only for now, not {cfg.strategy}; "
            f"sharded strategies train: {', '.join(SHARDED_METHODS)}"
        )
    if is_deepspeed(cfg.strategy) and not has_deepspeed():
        raise UserError(f"--strategy {cfg.strategy} needs DeepSpeed: {INSTALL}")


def _from_accelerate_launch() -> str:
    """The strategy `accelerate launch` asks for through its environment (its config file's
    distributed_type and ZeRO stage), else ddp."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        return f"zero{stage}" if stage in ("2", "3") else "ddp"
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"


def has_deepspeed() -> bool:
    """Whether DeepSpeed is installed (found without importing it: the launching process never needs it)."""
    try:
        return importlib.util.find_spec("deepspeed") is not None
    except ValueError:  # in sys.modules as None: hidden on purpose
        return False


def read_deepspeed(path: str) -> dict[str, Any]:
    """A user's DeepSpeed config file, as a dict."""
    from petune.files import read_json

    config = read_json(Path(path), "DeepSpeed config", "give a DeepSpeed JSON config (as HF Trainer takes)")
    if not isinstance(config, dict):
        raise UserError(f"--deepspeed {path}: the file must hold a JSON object, not {type(config).__name__}")
    return config


def _check_user_config(cfg: TrainConfig, config: dict[str, Any]) -> None:
    """Every field of `config` that petune's flags also set must agree with them (or be "auto")."""
    where = f"--deepspeed {cfg.deepspeed}"
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"{where}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if cfg.strategy == "ddp":
        if stage not in (2, 3):
            raise UserError(f"{where}: zero_optimization.stage is {stage!r}; petune runs ZeRO stage 2 or 3")
        cfg.strategy = f"zero{stage}"
    elif cfg.strategy != f"zero{stage}":
        raise UserError(f"{where}: zero_optimization.stage is {stage!r}, which contradicts --strategy {cfg.strategy}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UserError(f"{where}: remove the {section!r} section; petune trains with AdamW, --lr and --schedule")
    for section in ("fp16", "bf16"):
        if config.get(section, {}).get("enabled") not in (None, False, "auto"):
            raise UserError(
                f"{where}: {section}.enabled casts the trained tensors to 16 bits; remove it and pass --precision bf16 "
                f"(frozen base in bf16, trained tensors fp32)"
            )
    flags = {
        "train_micro_batch_size_per_gpu": ("batch-size", cfg.batch_size),
        "gradient_accumulation_steps": ("grad-accum", cfg.grad_accum),
        "gradient_clipping": ("max-grad-norm", cfg.max_grad_norm),
    }
    for field, (flag, value) in flags.items():
        if config.get(field, "auto") not in ("auto", value):
            raise UserError(f"{where}: {field} is {config[field]!r} but --{flag} is {value}: make them agree")
    offload = _user_offload(zero)
    if offload != "none" and cfg.offload == "none":
        cfg.offload = offload
    elif offload != cfg.offload:
        field = "offload_param" if "params" in (offload, cfg.offload) else "offload_optimizer"
        raise UserError(f"{where}: zero_optimization.{field} contradicts --offload {cfg.offload}")


def _user_offload(zero: dict[str, Any]) -> str:
    """What a ZeRO section offloads to the CPU: none, optimizer or params (which includes the optimizer)."""

    def on(name: str) -> bool:
        return zero.get(name, {}).get("device", "none") not in ("none", None)

    return "params" if on("offload_param") else "optimizer" if on("offload_optimizer") else "none"


def deepspeed_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config a run uses: the user's file (checked by `check`) with petune's flags filled in."""
    config = read_deepspeed(cfg.deepspeed) if cfg.deepspeed else {}
    zero = {**config.get("zero_optimization", {}), "stage": int(cfg.strategy[-1])}
    if cfg.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "cpu"}
    if cfg.offload == "params":
        zero["offload_param"] = {**zero.get("offload_param", {}), "device": "cpu"}
    config.update(
        train_micro_batch_size_per_gpu=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        train_batch_size=cfg.batch_size * cfg.grad_accum * world,
        gradient_clipping=cfg.max_grad_norm,
        zero_optimization=zero,
        # petune's torch AdamW (no fused DeepSpeed CPU Adam to compile), also with offload
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
        steps_per_print=2**31 - 1,
        wall_clock_breakdown=False,
    )
    config.setdefault("bf16", {"enabled": False})
    config.setdefault("fp16", {"enabled": False})
    return config


@contextlib.contextmanager
def loading_dtype(dtype: torch.dtype) -> Iterator[None]:
    """While the base model loads, the ZeRO-3 config transformers reads says `dtype`: transformers builds a ZeRO-3
    model inside `deepspeed.zero.Init`, which casts every floating-point tensor created there to the config's
    16-bit mode, else to fp32. petune's config has that mode off (the engine must not cast the trained tensors), so
    without this a `--precision bf16` base would be partitioned in fp32: twice the bytes. accelerate hands
    transformers a copy of the config, which this changes; the engine is built from the plugin's own."""
    import torch
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    config = deepspeed_config()
    if config is None or not is_deepspeed_zero3_enabled():
        yield
        return
    before = config.get("bf16", {"enabled": False})
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    try:
        yield
    finally:
        config["bf16"] = before


def zero3_gathering(model: Any) -> dict[str, int]:
    """ZeRO-3's limits on what each process holds gathered, in parameters, from the size of one decoder layer (the
    modules transformers keeps whole, `_no_split_modules`): the next layer prefetched while one computes, and a
    gathered parameter released after its module runs unless it is used again within one layer.

    DeepSpeed's defaults (a prefetch bucket of 5e7 parameters, at most 1e9 live, kept if reused within 1e9) keep a
    model under a billion parameters gathered whole from the second step on (the first records the order in which
    modules run): ZeRO-3 then holds more than one process with the whole model. SmolLM2-135M, LoRA, 2 processes on
    CPU: 2.7 GB a process with the defaults. A user's `--deepspeed` config keeps its own values.
    """
    kept = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    layers = [module for module in model.modules() if type(module).__name__ in kept]
    if not layers:
        return {}
    layer = max(sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()) for module in layers)
    return {
        "stage3_prefetch_bucket_size": layer,
        "stage3_max_live_parameters": 2 * layer,
        "stage3_max_reuse_distance": layer,
    }


def make_accelerator(cfg: TrainConfig, log_with: list[GeneralTracker] | None) -> Accelerator:
    """The `Accelerator` of `cfg.strategy` (every process calls this; gloo between CPU processes).

    accelerate enables its DeepSpeed and FSDP paths only for GPU-type processes; on a CPU the process group
    is made first as a CPU run (`PartialState(cpu=True)`: gloo), then the engine is switched on.
    """
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    cpu = not torch.cuda.is_available()
    if cfg.strategy == "ddp":  # on a CPU nothing to place (see `petune.train.loop.setup`)
        return Accelerator(cpu=cpu, log_with=log_with, device_placement=not cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cpu:
        PartialState(cpu=True)
    if is_deepspeed(cfg.strategy):
        import deepspeed

        # before the model loads: transformers builds a ZeRO-3 model already partitioned (`zero.Init`)
        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world))
        accelerator = Accelerator(deepspeed_plugin=plugin, log_with=log_with)
        expected = DistributedType.DEEPSPEED
    else:
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one shard group per decoder layer (_no_split_modules)
            reshard_after_forward=True,
            cpu_offload=cfg.offload == "params",
            state_dict_type="SHARDED_STATE_DICT",
        )
        accelerator = Accelerator(fsdp_plugin=fsdp, log_with=log_with)
        if cpu:
            accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            accelerator.state.fsdp_plugin = fsdp
        expected = DistributedType.FSDP
    if accelerator.distributed_type != expected:  # the engine would silently not run
        raise RuntimeError(f"accelerate set up {accelerator.distributed_type}, not {expected}")
    return accelerator


def describe(cfg: TrainConfig) -> str:
    """One line for the start of a run."""
    offload = "" if cfg.offload == "none" else f", offload {cfg.offload} to CPU"
    source = f" from {cfg.deepspeed}" if cfg.deepspeed else ""
    return f"strategy {cfg.strategy}{source}{offload}"

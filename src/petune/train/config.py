"""`TrainConfig`: every `petune train` option in one typed dataclass, with its default and help.

Options come from three layers, later ones winning: the defaults here (which are the demo run), a YAML
file (`--config run.yaml`), and command-line flags. Method options are nested sections named like
HF PEFT's config fields: `lora: {r: 16}` in YAML is `--lora.r 16` on the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from petune.files import one_line, read_text
from petune.train import UserError

METHOD_NAMES = (
    "full",
    "lora",
    "dora",
    "rslora",
    "qlora",
    "prompt",
    "ptuning",
    "prefix",
    "ia3",
    "ln_tuning",
    "loha",
    "lokr",
    "vera",
    "hra",
    "fourierft",
    "oft",
    "boft",
    "adalora",
)
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
OBJECTIVES = ("sft", "dpo")
PROMPT_METHODS = ("prompt", "ptuning", "prefix")  # virtual tokens in front of each row
REPORT_TO = ("none", "tensorboard", "mlflow", "trackio", "wandb")  # trackers.py


def option(default: Any, help: str) -> Any:
    """A dataclass field carrying its help text (shown by `petune train --help`)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraOptions:
    """LoRA options (also used by dora, rslora and qlora); names as in `LoraConfig`."""

    r: int = option(8, "rank of the low-rank update")
    lora_alpha: float = option(16.0, "the update is scaled by lora_alpha / r (rslora: / sqrt(r))")
    lora_dropout: float = option(0.0, "dropout on the input of the low-rank path")
    target_modules: list[str] | None = option(  # noqa: RUF009 (a fresh field per instance: option() is field())
        None, "layers to adapt: comma-separated names, or all-linear; default: the model's attention q/v"
    )


@dataclass
class QloraOptions:
    """How qlora quantises the frozen base model (bitsandbytes; Dettmers et al. 2023)."""

    bnb_4bit_quant_type: str = option("nf4", "4-bit data type: nf4 or fp4")
    bnb_4bit_use_double_quant: bool = option(True, "quantise the quantisation constants too (section 3)")


@dataclass
class PromptOptions:
    """Prompt tuning (Lester et al. 2021); names as in `PromptTuningConfig`."""

    # 50, not 20: on the demo data at `petune compare`'s budget, held-out exact match 58.3/26.7/53.3% -> 81.7/76.7/81.7%
    # (seeds 0/1/2; 100 tokens: 81.7% at seed 0) for 30 more positions a row (BENCHMARKS.md, issue 20).
    num_virtual_tokens: int = option(50, "number of trained virtual tokens prepended to the input")
    # SAMPLE_VOCAB, not HF PEFT's RANDOM (N(0, 1), far larger than SmolLM2's word embeddings): on the demo data at
    # `petune compare`'s budget, held-out exact match 13.3% -> 56.7% (BENCHMARKS.md, issue 20).
    prompt_tuning_init: str = option(
        "SAMPLE_VOCAB", "start of the virtual tokens: SAMPLE_VOCAB (embeddings of random words), RANDOM or TEXT"
    )
    prompt_tuning_init_text: str | None = option(None, "initialise the virtual tokens from this text (sets TEXT)")


@dataclass
class PtuningOptions:
    """P-tuning (Liu et al. 2021); names as in `PromptEncoderConfig`."""

    num_virtual_tokens: int = option(20, "number of virtual tokens")
    encoder_hidden_size: int = option(128, "hidden size of the prompt encoder")
    encoder_reparameterization_type: str = option("MLP", "prompt encoder: MLP or LSTM")


@dataclass
class PrefixOptions:
    """Prefix tuning (Li & Liang 2021); names as in `PrefixTuningConfig`."""

    num_virtual_tokens: int = option(20, "number of prefix positions per layer")
    # On, unlike HF PEFT's default: on the demo data at `petune compare`'s budget, held-out exact match 88.3% at lr
    # 2e-3 against 6.7% for the bare table at 3e-2 (BENCHMARKS.md, issue 20).
    prefix_projection: bool = option(True, "produce the prefix through a trained MLP (section 4.3)")
    encoder_hidden_size: int = option(512, "hidden size of that MLP")


TARGETS_HELP = "layers to adapt: comma-separated names, or all-linear; default: the method's usual layers"


@dataclass
class IA3Options:
    """(IA)^3 (Liu et al. 2022); names as in `IA3Config`. Default: the keys, values and down projection."""

    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009
    feedforward_modules: list[str] | None = option(  # noqa: RUF009
        None, "targets whose input (not output) is rescaled; default: the feed-forward output projection"
    )


@dataclass
class LnTuningOptions:
    """LN tuning (Zhao et al. 2024); names as in `LNTuningConfig`. Default: every normalisation layer."""

    target_modules: list[str] | None = option(None, "modules to tune; default: the normalisation layers")  # noqa: RUF009


@dataclass
class LohaOptions:
    """LoHa (Hyeon-Woo et al. 2022); names as in `LoHaConfig`."""

    r: int = option(8, "rank of each of the two factor pairs")
    alpha: float = option(16.0, "the update is scaled by alpha / r")
    rank_dropout: float = option(0.0, "in training, drop each output row of the update with this probability")
    module_dropout: float = option(0.0, "in training, skip the whole update with this probability")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class LokrOptions:
    """LoKr (Yeh et al. 2023); names as in `LoKrConfig`."""

    r: int = option(8, "rank of the second Kronecker factor when it is decomposed")
    alpha: float = option(16.0, "the update is scaled by alpha / r")
    decompose_both: bool = option(False, "also write the first Kronecker factor as a rank-r product")
    decompose_factor: int = option(-1, "split each dimension with one factor near this (-1: near its square root)")
    rank_dropout: float = option(0.0, "in training, drop each output row of the update with this probability")
    module_dropout: float = option(0.0, "in training, skip the whole update with this probability")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class VeraOptions:
    """VeRA (Kopiczko et al. 2024); names as in `VeraConfig`."""

    r: int = option(256, "rank of the shared frozen random matrices (costs no trained parameters but d)")
    d_initial: float = option(0.1, "initial value of the trained scaling vector d")
    vera_dropout: float = option(0.0, "dropout on the input of the VeRA path")
    projection_prng_key: int = option(0, "seed of the shared random matrices")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class HraOptions:
    """HRA (Yuan et al. 2024); names as in `HRAConfig`."""

    r: int = option(8, "number of Householder reflections (even: the model starts unchanged)")
    apply_GS: bool = option(False, "orthonormalise the reflection vectors first (Gram-Schmidt)")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class FourierftOptions:
    """FourierFT (Gao et al. 2024); names as in `FourierFTConfig`."""

    n_frequency: int = option(1000, "trained spectral coefficients per layer")
    scaling: float = option(150.0, "scale of the update (larger for fewer coefficients)")
    random_loc_seed: int = option(777, "seed that picks the trained entries of the spectrum")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class OftOptions:
    """OFT (Qiu et al. 2023); names as in `OFTConfig`."""

    oft_block_size: int = option(32, "size of each orthogonal block (b (b - 1) / 2 trained numbers per block)")
    use_cayley_neumann: bool = option(True, "approximate the Cayley transform by a Neumann series (faster)")
    module_dropout: float = option(0.0, "in training, this share of a layer's blocks act as the identity")
    coft: bool = option(False, "constrained OFT: keep each block within eps of the identity")
    eps: float = option(6e-5, "COFT's radius")
    block_share: bool = option(False, "all blocks of a layer share one trained matrix")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class BoftOptions:
    """BOFT (Liu et al. 2024); names as in `BOFTConfig`."""

    boft_block_size: int = option(8, "size of each orthogonal block")
    boft_n_butterfly_factor: int = option(2, "butterfly factors: each one mixes blocks twice as far apart")
    boft_dropout: float = option(0.0, "in training, this share of one factor's blocks act as the identity")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class AdaloraOptions:
    """AdaLoRA (Zhang et al. 2023); names as in `AdaLoraConfig`. total_step is --max-steps; the ranks are
    reallocated after every optimizer step and the orthogonality regulariser is part of the loss."""

    init_r: int = option(12, "every layer's rank at the start")
    target_r: int = option(8, "average rank per layer at the end")
    lora_alpha: float = option(32.0, "the update is scaled by lora_alpha / init_r")
    lora_dropout: float = option(0.0, "dropout on the input of the low-rank path")
    tinit: int | None = option(None, "steps at the full budget before ranks are pruned; default: a tenth of max-steps")
    tfinal: int | None = option(None, "steps at the final ranks, at the end; default: a fifth of max-steps")
    deltaT: int = option(1, "reallocate every N steps while the budget shrinks")
    beta1: float = option(0.85, "smoothing of the importance scores (moving average)")
    beta2: float = option(0.85, "smoothing of their uncertainty")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality regulariser in the loss")
    target_modules: list[str] | None = option(None, TARGETS_HELP)  # noqa: RUF009


@dataclass
class DpoOptions:
    """--objective dpo (Rafailov et al. 2023); the name as in TRL's `DPOConfig`."""

    beta: float = option(0.1, "β: how far the policy may move from the reference (the adapter switched off)")


@dataclass
class TrainConfig:
    """Everything `petune train` does. The defaults are the demo run on the embedded SmolLM2-135M-Instruct."""

    model: str | None = option(None, "base model: HF folder, .gguf file or hub id; default: embedded SmolLM2-135M")
    data: str | None = option(
        None, "training data: .jsonl, .json, .csv, .parquet, .arrow or a datasets folder; default: the demo set"
    )
    val_data: str | None = option(None, "held-out data file; default: --val-fraction of --data")
    val_fraction: float = option(0.1, "share of --data held out when there is no --val-data")
    output: str | None = option(None, "run folder; default: runs/<method>-<date>-<time>")
    objective: str = option(
        "sft", "sft: next-token loss on completions | dpo: prompt/chosen/rejected records, adapter off as reference"
    )
    method: str = option("lora", f"{' | '.join(METHOD_NAMES)}; full: every weight of the model trains, no adapter")
    max_steps: int = option(30, "optimizer steps")
    batch_size: int = option(8, "records per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches per optimizer step (global batch = batch-size x grad-accum x nproc)")
    lr: float | None = option(
        None,
        "peak learning rate; default: 1e-4 full, 2e-3 LoRA/LoHa/LoKr/HRA, 5e-3 OFT/BOFT, 1e-2 IA3/LN tuning/VeRA/"
        "FourierFT/AdaLoRA/P-tuning, 3e-2 prompt tuning, prefix tuning 2e-3 (3e-2 without its projection)",
    )
    schedule: str = option("cosine", f"learning-rate schedule after warmup: {' | '.join(SCHEDULES)}")
    warmup_steps: int = option(3, "steps of linear warmup from 0 to --lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    max_length: int = option(512, "tokens per example; longer examples are cut at the end (and counted)")
    train_on_prompt: bool = option(False, "also train on prompt tokens (default: loss on completions only)")
    packing: bool = option(
        False, "pack several examples into each max-length row, each attending only to itself (not prompt methods)"
    )
    padding_free: bool = option(
        True,
        "put each batch's examples into as few max-length rows as fit, each attending only to itself: the loss and "
        "gradients of padded rows without computing the padding (off for prompt methods, DPO and --packing)",
    )
    gradient_checkpointing: bool = option(
        False, "recompute each layer's activations in backward: less memory, slower steps (BENCHMARKS.md)"
    )
    precision: str = option("auto", f"{' | '.join(PRECISIONS)}; auto: bf16 on a GPU that supports it, else fp32")
    eval_every: int = option(10, "held-out loss every N steps (0: only at the end)")
    save_every: int = option(10, "checkpoint every N steps (0: none)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    eval_samples: int = option(60, "held-out records scored by generation (exact match) before and after; 0: none")
    eval_before: bool = option(True, "also score the base model before training")
    seed: int = option(0, "seed for adapter init, data order and dropout")
    report_to: list[str] = option(  # noqa: RUF009 (a fresh field per instance: option() is field())
        ["none"], f"also log metrics to: {' | '.join(REPORT_TO)}, comma-separated; offline, under the run folder"
    )
    nproc: int = option(1, "data-parallel processes (gloo on CPU); `accelerate launch --multi_gpu` works too")
    strategy: str = option(
        "ddp",
        "ddp: the whole model in every process | zero2, zero3: DeepSpeed ZeRO stage 2/3 | fsdp: torch FSDP2",
    )
    offload: str = option("none", "none | optimizer (zero2, zero3) | params (zero3, fsdp): that state in CPU memory")
    deepspeed: str | None = option(None, "a DeepSpeed JSON config (its ZeRO stage is the strategy); flags must agree")
    resume: bool = option(False, "continue the run in --output from its latest checkpoint")
    overwrite: bool = option(False, "replace an existing --output folder")
    lora: LoraOptions = field(default_factory=LoraOptions)
    qlora: QloraOptions = field(default_factory=QloraOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    ptuning: PtuningOptions = field(default_factory=PtuningOptions)
    prefix: PrefixOptions = field(default_factory=PrefixOptions)
    ia3: IA3Options = field(default_factory=IA3Options)
    ln_tuning: LnTuningOptions = field(default_factory=LnTuningOptions)
    loha: LohaOptions = field(default_factory=LohaOptions)
    lokr: LokrOptions = field(default_factory=LokrOptions)
    vera: VeraOptions = field(default_factory=VeraOptions)
    hra: HraOptions = field(default_factory=HraOptions)
    fourierft: FourierftOptions = field(default_factory=FourierftOptions)
    oft: OftOptions = field(default_factory=OftOptions)
    boft: BoftOptions = field(default_factory=BoftOptions)
    adalora: AdaloraOptions = field(default_factory=AdaloraOptions)
    dpo: DpoOptions = field(default_factory=DpoOptions)

    def __post_init__(self) -> None:
        choices = {"objective": OBJECTIVES, "method": METHOD_NAMES, "schedule": SCHEDULES, "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} {getattr(self, name)!r} is unknown; choose one of: {', '.join(allowed)}")
        positive = ["max_steps", "batch_size", "grad_accum", "max_length", "nproc", "keep_checkpoints"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ["warmup_steps", "eval_every", "save_every", "eval_samples", "max_grad_norm", "weight_decay"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        self._check_report_to()
        self._check_dpo()
        if self.packing and self.method in PROMPT_METHODS:
            raise UserError(
                f"--packing works with full fine-tuning and the LoRA methods; --method {self.method} adds its "
                f"virtual tokens once per row, not once per packed example: drop --packing"
            )
        if self.resume and self.output is None:
            raise UserError("--resume needs --output, the run folder to continue")
        from petune.train import strategy

        strategy.check(self)

    @property
    def packs_batches(self) -> bool:
        """Whether each batch's examples go into shared rows (`padding_free`; see `data.pack_batch`)."""
        return self.padding_free and not self.packing and self.objective == "sft" and self.method not in PROMPT_METHODS

    def _check_report_to(self) -> None:
        for name in self.report_to:
            if name not in REPORT_TO:
                raise UserError(
                    f"--report-to {name!r} is unknown; choose from: {', '.join(REPORT_TO)} (comma-separated)"
                )
        if "none" in self.report_to and len(self.report_to) > 1:
            raise UserError("--report-to none cannot be combined with trackers; give the trackers alone")

    def _check_dpo(self) -> None:
        if self.objective != "dpo":
            return
        if self.method == "full":
            raise UserError(
                "--objective dpo uses the model with its adapter switched off as the reference; "
                "--method full has no adapter: choose an adapter method (lora, ...)"
            )
        for name in ("packing", "train_on_prompt"):
            if getattr(self, name):
                raise UserError(f"--objective dpo scores each completion on its own: drop --{_flag(name)}")
        if self.dpo.beta <= 0:
            raise UserError(f"--dpo.beta must be positive, got {self.dpo.beta}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field[Any]]]:
    """{name: (resolved type, field)} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def option_table() -> list[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, help) for every option, nested sections included."""
    rows = []
    for name, (hint, f) in _fields(TrainConfig).items():
        if dataclasses.is_dataclass(hint):
            for sub, (sub_hint, sub_f) in _fields(hint).items():  # type: ignore[arg-type]
                rows.append((f"{name}.{sub}", sub_hint, _default(sub_f), sub_f.metadata["help"]))
        else:
            rows.append((name, hint, _default(f), f.metadata["help"]))
    return rows


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` (a flag's string or a YAML value) as type `hint`, or a UserError naming option `name`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text in ("true", "1", "yes")
        if typing.get_origin(hint) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(item).strip() for item in items if str(item).strip()]
        if hint is int and isinstance(value, float | bool):
            raise ValueError
        return hint(value)
    except (ValueError, TypeError):
        type_name = getattr(hint, "__name__", str(hint))
        raise UserError(f"option {name} expects {type_name}, got {value!r}") from None


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """`{"lora": {"r": 16}}` -> `{"lora.r": 16}`; dotted keys and `-` for `_` are accepted as they are."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": sub_value for sub, sub_value in flatten(value).items()})
        else:
            flat[key] = value
    return flat


def build_config(*layers: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from option mappings (YAML files, flags), later layers winning."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(flatten(layer))
    table = {name: hint for name, hint, _, _ in option_table()}
    unknown = sorted(k for k in values if k not in table)
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(unknown)}; see `petune train --help`")
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        typed = coerce(value, table[key], key)
        section, _, sub = key.partition(".")
        if sub:
            nested.setdefault(section, {})[sub] = typed
        else:
            top[key] = typed
    sections: dict[str, Any] = {n: h for n, (h, _) in _fields(TrainConfig).items() if dataclasses.is_dataclass(h)}
    for section, sub_values in nested.items():
        top[section] = sections[section](**sub_values)
    return TrainConfig(**top)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping, with clear errors for a missing or malformed file."""
    path = Path(path)
    text = read_text(path, "config file", "pass a YAML file of option: value lines (see `petune train --help`)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {one_line(str(error))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option: value, not a {type(data).__name__}")
    return data

"""The base adapter config: task type, method type, and the JSON round-trip in HF PEFT's field names.

An adapter folder holds `adapter_config.json` next to `adapter_model.safetensors`. The JSON keys are
HF PEFT's, so folders move both ways between petune and `peft`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from petune.files import read_json

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does; HF PEFT's values."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """The adapter method; HF PEFT's values, as written in `adapter_config.json`."""

    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    IA3 = "IA3"
    LN_TUNING = "LN_TUNING"
    LOHA = "LOHA"
    LOKR = "LOKR"
    VERA = "VERA"
    HRA = "HRA"
    FOURIERFT = "FOURIERFT"
    OFT = "OFT"
    BOFT = "BOFT"
    ADALORA = "ADALORA"


# Classification heads HF PEFT trains and saves for SEQ_CLS without being asked.
CLASSIFIER_MODULE_NAMES = ("classifier", "score")

C = TypeVar("C", bound="PeftConfig")


@dataclass
class PeftConfig:
    """Fields every adapter config has.

    Args:
        task_type: one of `TaskType` (or its string value); None for a plain `torch.nn.Module`.
        base_model_name_or_path: where the base model came from; filled in by `get_peft_model`.
        inference_mode: True when the adapter is loaded frozen.
        modules_to_save: base-model modules that are copied, trained in full and saved with the adapter,
            e.g. a classification head. As in HF PEFT, a module is picked when its qualified name ends with
            one of these strings (no `.` boundary: `"norm"` also picks `input_layernorm`).
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = field(default=None, init=False)
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                choices = ", ".join(t.value for t in TaskType)
                raise ValueError(f"task_type={self.task_type!r} is unknown; use one of: {choices}") from None
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.task_type == TaskType.SEQ_CLS:
            # The new head is random: it has to be trained and saved, as HF PEFT does.
            extra = [name for name in CLASSIFIER_MODULE_NAMES if name not in (self.modules_to_save or [])]
            self.modules_to_save = [*(self.modules_to_save or []), *extra]
        if "transformers.trainer" in sys.modules:  # this config may go to a TRL trainer's `peft_config=`
            from petune.integrations.trainer import recognise_if_trainer_imported

            recognise_if_trainer_imported()

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that add virtual tokens instead of changing layers."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, enums as their string values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config, ignoring (with a warning) keys this version does not know."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(k for k in data if k not in known and k != "peft_type")
        # HF PEFT writes many fields for features petune has no use for; only warn when one is set.
        meaningful = [k for k in unknown if data[k] not in (None, False, {}, [], "") and k not in _HF_ONLY_KEYS]
        if meaningful:
            warnings.warn(
                f"{cls.__name__}: ignoring adapter config fields petune does not support: {', '.join(meaningful)}",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | Path, subfolder: str | None = None) -> PeftConfig:
        """Read an adapter folder's config as the subclass its `peft_type` names."""
        from petune.methods import method_class  # the method table imports this module

        path = Path(directory) / subfolder if subfolder else Path(directory)
        data = read_config_dict(path)
        config_class = method_class(data["peft_type"]).config_class
        if not issubclass(config_class, cls):
            raise ValueError(f"{path} holds a {data['peft_type']} adapter, not a {cls.__name__}")
        return config_class.from_dict(data)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `adapter_config.json` into `save_directory`."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# Bookkeeping fields HF PEFT writes that carry no meaning for loading an adapter.
_HF_ONLY_KEYS = {
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "num_transformer_submodules",
}


def read_config_dict(directory: str | Path) -> dict[str, Any]:
    """The raw `adapter_config.json` of an adapter folder, with a clear error when it is missing."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if Path(directory).is_dir():
            subfolders = sorted(p.parent.name for p in Path(directory).glob(f"*/{CONFIG_NAME}"))
            if subfolders:
                hint = f"; adapters found in subfolders: {', '.join(subfolders)} (pass subfolder=NAME)"
        raise FileNotFoundError(f"no adapter config at {path}{hint}")
    data = read_json(path, "adapter config", "copy the adapter folder again from where it was saved, or retrain it")
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{path} has no 'peft_type' field; is it an adapter config?")
    return data

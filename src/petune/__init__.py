"""petune: parameter-efficient fine-tuning with Hugging Face PEFT's API and adapter files.

Switch from HF PEFT by changing the import: `from petune import LoraConfig, get_peft_model`.

The names below are imported on first use (PEP 562), so `import petune.memory` or `petune --help` does not
load torch and transformers; the `petune` command starts itself again on mimalloc before it does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petune.config import PeftConfig, PeftType, TaskType
    from petune.hotswap import hotswap_adapter
    from petune.layers import BASE_ADAPTER
    from petune.methods.adalora import AdaLoraConfig
    from petune.methods.boft import BOFTConfig
    from petune.methods.fourierft import FourierFTConfig
    from petune.methods.hra import HRAConfig
    from petune.methods.ia3 import IA3Config
    from petune.methods.ln_tuning import LNTuningConfig
    from petune.methods.loha import LoHaConfig
    from petune.methods.lokr import LoKrConfig
    from petune.methods.lora import LoraConfig, create_loraplus_optimizer
    from petune.methods.oft import OFTConfig
    from petune.methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
    from petune.methods.prefix_tuning import PrefixTuningConfig
    from petune.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
    from petune.methods.vera import VeraConfig
    from petune.peft_model import (
        PeftModel,
        PeftModelForCausalLM,
        PeftModelForFeatureExtraction,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
        get_peft_model,
    )

__version__ = "0.1.0"


_SOURCES = {
    "AdaLoraConfig": "petune.methods.adalora",
    "BASE_ADAPTER": "petune.layers",
    "BOFTConfig": "petune.methods.boft",
    "FourierFTConfig": "petune.methods.fourierft",
    "HRAConfig": "petune.methods.hra",
    "IA3Config": "petune.methods.ia3",
    "LNTuningConfig": "petune.methods.ln_tuning",
    "LoHaConfig": "petune.methods.loha",
    "LoKrConfig": "petune.methods.lokr",
    "LoraConfig": "petune.methods.lora",
    "OFTConfig": "petune.methods.oft",
    "PeftConfig": "petune.config",
    "PeftModel": "petune.peft_model",
    "PeftModelForCausalLM": "petune.peft_model",
    "PeftModelForFeatureExtraction": "petune.peft_model",
    "PeftModelForSeq2SeqLM": "petune.peft_model",
    "PeftModelForSequenceClassification": "petune.peft_model",
    "PeftModelForTokenClassification": "petune.peft_model",
    "PeftType": "petune.config",
    "PrefixTuningConfig": "petune.methods.prefix_tuning",
    "PromptEncoderConfig": "petune.methods.p_tuning",
    "PromptEncoderReparameterizationType": "petune.methods.p_tuning",
    "PromptTuningConfig": "petune.methods.prompt_tuning",
    "PromptTuningInit": "petune.methods.prompt_tuning",
    "TaskType": "petune.config",
    "VeraConfig": "petune.methods.vera",
    "create_loraplus_optimizer": "petune.methods.lora",
    "get_peft_model": "petune.peft_model",
    "hotswap_adapter": "petune.hotswap",
}

__all__ = [
    "BASE_ADAPTER",
    "AdaLoraConfig",
    "BOFTConfig",
    "FourierFTConfig",
    "HRAConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "VeraConfig",
    "__version__",
    "create_loraplus_optimizer",
    "get_peft_model",
    "hotswap_adapter",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'petune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

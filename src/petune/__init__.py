"""petune: parameter-efficient fine-tuning with Hugging Face PEFT's API and adapter files.

Switch from HF PEFT by changing the import: `from petune import LoraConfig, get_peft_model`.
"""

from petune.config import PeftConfig, PeftType, TaskType
from petune.layers import BASE_ADAPTER
from petune.methods.lora import LoraConfig, create_loraplus_optimizer
from petune.methods.p_tuning import PromptEncoderConfig, PromptEncoderReparameterizationType
from petune.methods.prefix_tuning import PrefixTuningConfig
from petune.methods.prompt_tuning import PromptTuningConfig, PromptTuningInit
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

__all__ = [
    "BASE_ADAPTER",
    "LoraConfig",
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
    "__version__",
    "create_loraplus_optimizer",
    "get_peft_model",
]

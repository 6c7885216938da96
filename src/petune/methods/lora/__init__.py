"""LoRA (Hu et al. 2021) and its family: rsLoRA, DoRA, PiSSA initialisation, LoRA+."""

from petune.methods.lora.config import LoraConfig
from petune.methods.lora.layer import LoraAdapter, LoraLayer
from petune.methods.lora.model import Lora
from petune.methods.lora.optim import create_loraplus_optimizer

__all__ = ["Lora", "LoraAdapter", "LoraConfig", "LoraLayer", "create_loraplus_optimizer"]

"""The method table: adapter type -> implementation. Adding a method is one package and one line here."""

from __future__ import annotations

from petune.config import PeftType
from petune.methods.adalora import AdaLora
from petune.methods.base import Method
from petune.methods.boft import BOFT
from petune.methods.fourierft import FourierFT
from petune.methods.hra import HRA
from petune.methods.ia3 import IA3
from petune.methods.ln_tuning import LNTuning
from petune.methods.loha import LoHa
from petune.methods.lokr import LoKr
from petune.methods.lora import Lora
from petune.methods.oft import OFT
from petune.methods.p_tuning import PTuning
from petune.methods.prefix_tuning import PrefixTuning
from petune.methods.prompt_tuning import PromptTuning
from petune.methods.vera import Vera

METHODS: dict[str, type[Method]] = {
    PeftType.LORA.value: Lora,
    PeftType.PROMPT_TUNING.value: PromptTuning,
    PeftType.P_TUNING.value: PTuning,
    PeftType.PREFIX_TUNING.value: PrefixTuning,
    PeftType.IA3.value: IA3,
    PeftType.LN_TUNING.value: LNTuning,
    PeftType.LOHA.value: LoHa,
    PeftType.LOKR.value: LoKr,
    PeftType.VERA.value: Vera,
    PeftType.HRA.value: HRA,
    PeftType.FOURIERFT.value: FourierFT,
    PeftType.OFT.value: OFT,
    PeftType.BOFT.value: BOFT,
    PeftType.ADALORA.value: AdaLora,
}


def method_class(peft_type: str | PeftType) -> type[Method]:
    """The implementation of `peft_type`, or an error listing the supported ones."""
    key = peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)
    if key not in METHODS:
        raise ValueError(f"peft_type {key!r} is not supported by petune; supported: {', '.join(METHODS)}")
    return METHODS[key]

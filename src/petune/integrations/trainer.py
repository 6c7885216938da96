"""petune models in transformers' `Trainer` and TRL's trainers (`SFTTrainer`, `DPOTrainer`, ...).

What those trainers read from a PEFT model, found in their source (transformers 5.25, accelerate 1.16, TRL 1.16):

- whether it is one: `transformers.trainer_utils._is_peft_model` and `accelerate.utils.is_peft_model` (which every
  TRL trainer imports), both `isinstance(model, peft.PeftModel)`, False when peft is not installed. Nothing
  else (no attribute, no protocol) makes a model count as a PEFT model, and a model that does not count is
  trained as a full model: Trainer keeps only the dataset columns named by the wrapper's own forward, saves
  every weight in each checkpoint and resumes from those; TRL patches its fused LM head onto the wrapper;
- once recognised: `get_base_model()` (whose forward signature chooses the dataset columns and label names, and
  onto which TRL patches its fused LM head: the wrapper's forward then reaches it with `fused_lm_head=True`);
  `save_pretrained(dir, state_dict=..., is_main_process=...)` for every checkpoint and `save_model`;
  `active_adapters` and `load_adapter(dir, active_adapters[0], is_trainable=True)` to resume (into the adapter
  being trained) and to load the best checkpoint; `enable_input_require_grads()` (TRL, with gradient
  checkpointing); `peft_config["default"]`, `add_adapter("ref", config)`, `named_parameters()` with
  `.default.` in adapter names, `active_adapter`, `set_adapter` and `disable_adapter()` (TRL's reference model:
  a frozen copy of the adapter, or the adapter switched off).

- TRL's `peft_config=`: `isinstance(peft_config, peft.PeftConfig)`, then peft's `get_peft_model(model, config)`.

petune's `PeftModel` has all of the second list. The first needs a patch, since `isinstance` against peft's class
is the only test: `recognise_petune_models()` extends exactly those predicates (and the class `Trainer._save`
saves through `save_pretrained`) to also accept a petune `PeftModel`, and adds a callback that stops a trainer,
with a petune error, from training a petune model that cannot train. Every other model is judged as before. The
third likewise: in TRL's trainer modules a petune config passes the check and goes to petune's `get_peft_model`.
`PeftModel` and every petune config apply it when created if transformers' trainer is imported by then (a script
importing `Trainer` or TRL at the top), and `PETUNE_TRAINER_PATCH=0` turns that off; a script may also call it.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from petune.layers import AdapterLayer

# Module -> the name it binds `isinstance(model, peft.PeftModel)` to (each module imported the function by value).
TRANSFORMERS_PREDICATES = {
    "transformers.trainer_utils": "_is_peft_model",
    "transformers.trainer": "_is_peft_model",
    "transformers.integrations.neftune": "_is_peft_model",
}
ACCELERATE_PREDICATES = {
    "accelerate.utils": "is_peft_model",
    "accelerate.utils.modeling": "is_peft_model",
    "accelerate.utils.fsdp_utils": "is_peft_model",
}
ORIGINAL = "__petune_original__"  # the attribute a patched predicate keeps the library's own function under


def enabled_by_default() -> bool:
    """Whether `PeftModel` applies `recognise_petune_models()` on creation (unless `PETUNE_TRAINER_PATCH=0`)."""
    return os.environ.get("PETUNE_TRAINER_PATCH", "1") != "0"


def recognise_if_trainer_imported() -> None:
    """`recognise_petune_models()` if transformers' trainer is imported already (what `PeftModel` calls).

    Importing it here would cost every `PeftModel` seconds (it imports peft and bitsandbytes where installed), so a
    script that imports `Trainer` or TRL only after making its model calls `recognise_petune_models()` itself.
    """
    if enabled_by_default() and "transformers.trainer" in sys.modules:
        recognise_petune_models()


def recognise_petune_models() -> None:
    """Make transformers' `Trainer`, accelerate and TRL treat a petune `PeftModel` as the PEFT model it is.

    Patches, in `transformers.trainer` (imported here) and the other modules already imported:
    - transformers' `_is_peft_model` and accelerate's `is_peft_model` (so TRL's, which import it): also True for a
      petune `PeftModel`;
    - `transformers.trainer.PeftModel` / `is_peft_available`, which `Trainer._save` reads to decide whether the
      model saves itself with `save_pretrained` (the adapter) or has its whole state dict written;
    - `transformers.trainer.DEFAULT_CALLBACKS`: `PetuneTrainingCheck`, which raises `check_can_train`'s error;
    - in TRL's trainer modules, `PeftConfig` and `get_peft_model`, so `peft_config=` takes a petune config
      (`_take_petune_configs`).
    A TRL module imported later takes accelerate's patched predicate itself. Idempotent.
    """
    importlib.import_module("transformers.trainer")
    for module_name, attribute in TRANSFORMERS_PREDICATES.items():
        _patch(module_name, attribute, unwrap_parallel=False)
    for module_name, attribute in ACCELERATE_PREDICATES.items():
        _patch(module_name, attribute, unwrap_parallel=True)
    accelerate_original = getattr(sys.modules["accelerate.utils"].is_peft_model, ORIGINAL)
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("trl."):
            continue
        if getattr(module, "is_peft_model", None) is accelerate_original:
            _patch(module_name, "is_peft_model", unwrap_parallel=True)
        _take_petune_configs(module)
    _let_trainer_save_adapters(sys.modules["transformers.trainer"])


def _take_petune_configs(trl_module: Any) -> None:
    """Let a TRL trainer's `peft_config=` be a petune config: the trainer then wraps the model with petune.

    Each TRL trainer that takes `peft_config=` (SFT, DPO, GRPO, KTO, RLOO, reward, ...) imported peft's `PeftConfig`
    and `get_peft_model` by name, checks `isinstance(peft_config, PeftConfig)` and then calls
    `get_peft_model(model, peft_config, **kwargs)`; its module uses `PeftConfig` for nothing else. Such a module's
    `PeftConfig` becomes the pair (peft's, petune's) and its `get_peft_model` hands a petune config to petune's.
    Without peft installed TRL refuses `peft_config=` before reading it: wrap the model with petune instead.
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return
    names = ("PeftConfig", "get_peft_model")
    if any(getattr(trl_module, name, None) is not getattr(peft, name) for name in names):
        return
    from petune.config import PeftConfig

    trl_module.PeftConfig = (peft.PeftConfig, PeftConfig)
    trl_module.get_peft_model = _petune_for_petune_configs(peft.get_peft_model)


def _petune_for_petune_configs(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` (peft's `get_peft_model`), with a petune config given to petune's `get_peft_model` instead."""
    from petune.config import PeftConfig
    from petune.peft_model import get_peft_model as petune_get_peft_model

    @functools.wraps(original)
    def get_peft_model(model: Any, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(peft_config, PeftConfig):
            return petune_get_peft_model(model, peft_config, *args, **kwargs)
        return original(model, peft_config, *args, **kwargs)

    setattr(get_peft_model, ORIGINAL, original)
    return get_peft_model


def _patch(module_name: str, attribute: str, unwrap_parallel: bool) -> None:
    module = sys.modules.get(module_name)
    original = getattr(module, attribute, None)
    if original is None or hasattr(original, ORIGINAL):
        return
    setattr(module, attribute, _recognising(original, unwrap_parallel))


def _recognising(original: Callable[[Any], bool], unwrap_parallel: bool) -> Callable[[Any], bool]:
    """`original` (peft's `isinstance` test), also True for a petune `PeftModel` (inside DDP & co. if asked)."""
    from accelerate.utils import extract_model_from_parallel

    from petune.peft_model import PeftModel

    @functools.wraps(original)
    def is_peft_model(model: Any) -> bool:
        inner = extract_model_from_parallel(model) if unwrap_parallel else model
        return isinstance(inner, PeftModel) or bool(original(model))

    setattr(is_peft_model, ORIGINAL, original)
    return is_peft_model


def _let_trainer_save_adapters(trainer_module: Any) -> None:
    """`Trainer._save` calls `save_pretrained` on models of `(PreTrainedModel, PeftModel)` when peft is available."""
    from petune.peft_model import PeftModel

    if getattr(trainer_module, "_petune_saves_adapters", False):
        return
    peft_class = getattr(trainer_module, "PeftModel", None) if trainer_module.is_peft_available() else None
    trainer_module.PeftModel = PeftModel if peft_class is None else (peft_class, PeftModel)
    # Read by `_save` (to use the class above) and by `push_to_hub` (to copy adapter files too); nothing else here.
    trainer_module.is_peft_available = _peft_or_petune_available
    trainer_module.DEFAULT_CALLBACKS.append(training_check_callback())
    trainer_module._petune_saves_adapters = True


def _peft_or_petune_available() -> bool:
    return True


def check_can_train(model: nn.Module) -> None:
    """Raise a one-line error if `model` is a petune `PeftModel` in a state no trainer can train.

    Such a model would otherwise fail deep inside the trainer ("optimizer got an empty parameter list", "element 0
    of tensors does not require grad") or, merged, train weights its forward no longer reads.
    """
    from accelerate.utils import extract_model_from_parallel

    from petune.peft_model import PeftModel

    model = extract_model_from_parallel(model)
    if not isinstance(model, PeftModel):
        return
    if model.active_adapter is None:
        raise ValueError("this petune model has no active adapter: call set_adapter(name) before training")
    if model._disabled:
        raise ValueError(
            "this petune model's adapters are disabled (inside `with model.disable_adapter():`): "
            "train outside that block"
        )
    if model._merged:
        raise ValueError(
            f"adapter(s) {model._merged} are merged into the base weights, where they get no gradient: "
            f"call model.unmerge_adapter() before training"
        )
    if _runs_trl_fused_head(model) and isinstance(model.get_output_embeddings(), AdapterLayer):
        raise ValueError(
            "TRL computes log-probabilities from lm_head.weight directly (its fused LM head), so an adapter on "
            "lm_head would never train: remove 'lm_head' from target_modules and modules_to_save"
        )
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError(
            f"this petune model has no trainable parameters (adapter {model.active_adapter!r} was loaded for "
            f"inference): load it with PeftModel.from_pretrained(..., is_trainable=True)"
        )


def _runs_trl_fused_head(model: Any) -> bool:
    """Whether TRL's `add_fused_lm_head` replaced the base model's forward (an instance attribute it sets)."""
    forward = vars(model.get_base_model()).get("forward")
    function = getattr(forward, "__func__", None)
    return getattr(getattr(function, "__code__", None), "co_name", "") == "_fused_forward"


@functools.cache
def training_check_callback() -> type:
    """`PetuneTrainingCheck`, a transformers `TrainerCallback` running `check_can_train` when a trainer is made
    and when its training starts (made on first use: importing transformers' callbacks imports its trainer utils)."""
    from transformers import TrainerCallback

    class PetuneTrainingCheck(TrainerCallback):
        def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if kwargs.get("model") is not None:
                check_can_train(kwargs["model"])

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if kwargs.get("model") is not None:
                check_can_train(kwargs["model"])

    return PetuneTrainingCheck

"""`PeftModel`: a frozen base model plus named adapters, with HF PEFT's API and file format.

Nothing here knows which method an adapter uses: the method table (`petune.methods`) supplies the
few hooks where methods differ, and `AdapterLayer` keeps the per-adapter bookkeeping.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from petune import io, kernels, targets
from petune.config import CLASSIFIER_MODULE_NAMES, PeftConfig
from petune.integrations import trainer as trainer_integration
from petune.layers import (
    BASE_ADAPTER,
    ModulesToSave,
    adapter_layers,
    batch_adapters,
    replace_module,
)
from petune.loss_only import LossOnlyOutput, computes_loss_only, loss_only_forward, release_spent, watched
from petune.methods import method_class
from petune.methods.base import Method, base_generate
from petune.quantization import keep_4bit_layers_trainable


class PeftModel(nn.Module):
    """Wraps `model` (a transformers model or any `nn.Module`) with adapter `adapter_name`.

    The base model's own parameters are frozen; only the active adapter's parameters train. Its RMSNorm and
    SwiGLU modules run petune's memory-saving kernels (`petune.kernels`: same outputs, less kept for backward)
    unless the environment sets `PETUNE_KERNELS=0`; `petune.kernels.disable(model)` turns them off, and
    `unload()` / `merge_and_unload()` return the base model without them (`get_base_model()` returns the live
    base model, kernels in place; its outputs are stock transformers', bit for bit but in bf16 training on a CPU,
    where they equal them to rounding).

    `return_logits`: False (the default) lets a training-mode forward with `labels=` compute its loss without
    the full logits and return none (`petune.loss_only`); True always returns them, as the base model does.
    `detach_spent_loss`: True (the default) lets such a forward detach the loss the previous one returned once a
    backward has freed its graph, which on glibc's malloc keeps the heap from growing (`petune.loss_only`).
    """

    return_logits = False
    detach_spent_loss = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; call add_adapter() to give it another adapter")
        self.base_model = model
        self.adapter_modules = nn.ModuleDict()  # adapter weights kept outside the base model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | None = adapter_name
        self._method: Method | None = None
        self._merged: list[str] = []
        self._disabled = False
        model.requires_grad_(False)
        keep_4bit_layers_trainable(model)
        if kernels.enabled_by_default():
            kernels.enable(model)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)
        trainer_integration.recognise_if_trainer_imported()  # transformers' Trainer and TRL see a PEFT model

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Attach a new adapter (not activated: call `set_adapter`)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete it or pick a new name")
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for 'no adapter' in mixed batches")
        cls = method_class(peft_config.peft_type or "")
        if self._method is None:
            self._method = cls(self.base_model)
        elif not isinstance(self._method, cls):
            raise ValueError(
                f"this model has {type(self._method).__name__} adapters; a {peft_config.peft_type} adapter "
                f"cannot join them in one PeftModel"
            )
        peft_config = copy.deepcopy(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(self.base_model, "name_or_path", None) or None
        module = self._method.add(adapter_name, peft_config)
        if module is not None:
            self.adapter_modules[adapter_name] = module
        if peft_config.modules_to_save:
            self._add_modules_to_save(adapter_name, peft_config.modules_to_save)
        self.peft_config[adapter_name] = peft_config
        for _, layer in adapter_layers(self.base_model):
            layer.set_active(self.active_adapter)
        self._update_trainable()

    def _add_modules_to_save(self, adapter_name: str, names: list[str]) -> None:
        # Never reach inside an adapter layer (`...q_proj.adapters.default` must not match "default").
        wrapped = [n for n, _ in adapter_layers(self.base_model)]
        found = [
            n
            for n, _ in self.base_model.named_modules()
            if n and targets.is_module_to_save(names, n) and not any(n.startswith(f"{w}.") for w in wrapped)
        ]
        found = [n for n in found if not any(n.startswith(f"{f}.") for f in found)]
        if not found:
            user_names = [n for n in names if n not in CLASSIFIER_MODULE_NAMES]
            if user_names:
                raise ValueError(f"modules_to_save={names} matched no module of {type(self.base_model).__name__}")
            return
        for module_name in found:
            module = self.base_model.get_submodule(module_name)
            if not isinstance(module, ModulesToSave):
                module.requires_grad_(False)  # the original stays frozen (even with bias="all"); copies train
                module = ModulesToSave(module)
                replace_module(self.base_model, module_name, module)
            module.add(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the one forward and generate use, and the only trainable one."""
        self._check_exists(adapter_name)
        self.active_adapter = adapter_name
        for _, layer in adapter_layers(self.base_model):
            layer.set_active(adapter_name)
        self._update_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; layers left with no adapter go back to their original module."""
        self._check_exists(adapter_name)
        if adapter_name in self._merged:
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() first")
        for layer_name, layer in list(adapter_layers(self.base_model)):
            layer.delete(adapter_name)
            if not layer.adapters:
                replace_module(self.base_model, layer_name, layer.base_layer)
        if adapter_name in self.adapter_modules:
            del self.adapter_modules[adapter_name]
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            # HF PEFT's choice: the first remaining adapter in sorted order becomes active (and trainable).
            remaining = sorted(self.peft_config)
            self.active_adapter = None
            if remaining:
                warnings.warn(
                    f"deleted the active adapter {adapter_name!r}; {remaining[0]!r} is now active", stacklevel=2
                )
                self.set_adapter(remaining[0])

    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, *args: Any, **kwargs: Any
    ) -> None:
        """LoRA: add `adapter_name` combining `adapters` with `weights`; HF PEFT's further arguments, in its order
        (`combination_type="svd"`, `svd_rank`, ...). See `petune.methods.lora.weighted.add_weighted_adapter`."""
        from petune.methods.lora.weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA: update the importance scores and the rank budget after optimizer step `global_step` (call it
        after `optimizer.step()`, before `zero_grad()`), as HF PEFT's `update_and_allocate`."""
        allocate = getattr(self._method, "update_and_allocate", None)
        if allocate is None:
            raise TypeError(f"update_and_allocate is AdaLoRA's; this model has {type(self._method).__name__} adapters")
        allocate(global_step)

    def training_state(self) -> dict[str, Any]:
        """What the method keeps between optimizer steps besides the trained tensors (AdaLoRA's importance
        scores and rank pattern; empty for the others): `petune train`'s checkpoints save it."""
        return getattr(self._method, "training_state", dict)()

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Give back what `training_state` returned (a resumed run)."""
        load = getattr(self._method, "load_training_state", None)
        if load is not None:
            load(state)

    @property
    def allocates_ranks(self) -> bool:
        """Whether `update_and_allocate` should run after each optimizer step (a trainable AdaLoRA adapter)."""
        return getattr(self._method, "allocator", None) is not None

    def loss_penalty(self) -> torch.Tensor | None:
        """The term the adapter's method adds to a training loss (AdaLoRA's orthogonality regulariser), or None;
        the method adds it itself to a loss the model computes from `labels`."""
        assert self._method is not None
        return self._method.penalty()

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    @property
    def active_peft_config(self) -> PeftConfig:
        assert self.active_adapter is not None, "no adapter is active"
        return self.peft_config[self.active_adapter]

    def _check_exists(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")

    def _adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        for _, layer in adapter_layers(self.base_model):
            if adapter_name in layer.adapters:
                yield from layer.adapters[adapter_name].parameters()
        if adapter_name in self.adapter_modules:
            yield from self.adapter_modules[adapter_name].parameters()

    def _update_trainable(self) -> None:
        for name, config in self.peft_config.items():
            trainable = name == self.active_adapter and not config.inference_mode
            for param in self._adapter_parameters(name):
                param.requires_grad_(trainable)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly what the base model does."""
        merged = list(self._merged)
        if merged:
            self.unmerge_adapter()
        for _, layer in adapter_layers(self.base_model):
            layer.set_active(None)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for _, layer in adapter_layers(self.base_model):
                layer.set_active(self.active_adapter)
            if merged:
                self.merge_adapter(merged)

    # --- running ----------------------------------------------------------------------------------

    def _routing(self, adapter_names: Sequence[str] | None) -> contextlib.AbstractContextManager[None]:
        if adapter_names is None:
            return contextlib.nullcontext()
        assert self._method is not None
        if not self._method.supports_mixed_batch:
            raise ValueError(f"adapter_names=[...] (mixed batches) is not supported by {type(self._method).__name__}")
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names names unknown adapters {unknown}; adapters: {list(self.peft_config)}")
        if self._merged:
            raise ValueError("adapter_names=[...] needs unmerged adapters; call unmerge_adapter() first")
        return batch_adapters(adapter_names)

    def _hook_args(self) -> tuple[str, PeftConfig, nn.Module | None]:
        name = self.active_adapter
        assert name is not None, "no adapter is active"
        return name, self.peft_config[name], self._adapter_module(name)

    def _adapter_module(self, adapter_name: str) -> nn.Module | None:
        """The module a method keeps outside the base model for this adapter (a prompt encoder), if any."""
        return self.adapter_modules[adapter_name] if adapter_name in self.adapter_modules else None  # noqa: SIM401

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward through the active adapter (or, per row, `adapter_names`).

        In training mode with token `labels=` (a causal LM), the loss is computed without the full logits and
        the output has none (`petune.loss_only`); `model.return_logits = True` or `model.eval()` gives them.
        """
        assert self._method is not None
        if computes_loss_only(self, args, kwargs):
            release_spent(self)
            names = {} if adapter_names is None else {"adapter_names": adapter_names}
            output = loss_only_forward(self, args, {**kwargs, **names})
            penalty = self._method.penalty()  # what the method adds to a `labels=` loss (AdaLoRA's regulariser)
            assert output.loss is not None
            loss = output.loss if penalty is None else output.loss + penalty
            return LossOnlyOutput(loss=watched(self, loss))  # the next call detaches it once spent (petune.loss_only)
        with self._routing(adapter_names):
            if self._disabled or self.active_adapter is None:
                return self.base_model(*args, **kwargs)
            return self._method.forward(*self._hook_args(), args, kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate` through the active adapter (or, per row, `adapter_names`)."""
        assert self._method is not None
        if args:
            kwargs["input_ids"], *rest = args
            if rest:
                raise TypeError("generate() takes input_ids as its only positional argument")
        with self._routing(adapter_names):
            if self._disabled or self.active_adapter is None:
                return base_generate(self.base_model, kwargs)
            return self._method.generate(*self._hook_args(), kwargs)

    # --- merging ----------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (zero inference cost); `unmerge_adapter` undoes it."""
        assert self._method is not None
        names = list(adapter_names) if adapter_names else self.active_adapters
        for name in names:
            self._check_exists(name)
        new = [n for n in names if n not in self._merged]
        try:
            self._method.merge(new, safe_merge)
        except Exception:
            # A refused safe merge must not leave some layers merged: undo this call's layers.
            self._method.unmerge()
            self._method.merge(self._merged, False)
            raise
        self._merged += new

    def unmerge_adapter(self) -> None:
        assert self._method is not None
        self._method.unmerge()
        self._merged = []

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the adapters into the weights and return the plain base model, with no adapter module left."""
        del progressbar
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the base model without adapter modules (merged weights stay merged).

        A `modules_to_save` module is replaced by the active adapter's trained copy, as in HF PEFT.
        """
        for layer_name, layer in list(adapter_layers(self.base_model)):
            keep = layer.base_layer
            active = self.active_adapter
            if isinstance(layer, ModulesToSave) and active is not None and active in layer.adapters:
                keep = layer.adapters[active]
            replace_module(self.base_model, layer_name, keep)
        kernels.disable(self.base_model)
        if self._method is not None:
            self._method.unload()
        self._merged = []
        return self.base_model

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # --- saving and loading -----------------------------------------------------------------------

    def adapter_state_dict(
        self, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Adapter `adapter_name`'s tensors under HF PEFT's file keys.

        `state_dict` (this model's own, e.g. gathered by DeepSpeed ZeRO-3 or FSDP, which `Trainer` passes to
        `save_pretrained`): the adapter layers' tensors are taken from it rather than from the live parameters.
        """
        assert self._method is not None
        config = self.peft_config[adapter_name]
        module = self._adapter_module(adapter_name)
        params = io.layer_parameters(self.base_model, adapter_name, self._method.file_prefix)
        tensors = {k: p.detach() for k, p in params.items()}
        if state_dict is not None:
            own_name = {id(param): name for name, param in self.named_parameters(remove_duplicate=False)}
            tensors = {k: state_dict.get(own_name[id(p)], tensors[k]) for k, p in params.items()}
        tensors = self._method.to_file(adapter_name, config, tensors)
        tensors.update(self._method.state_dict(adapter_name, config, module))
        return tensors

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as `adapter_config.json` + `adapter_model.safetensors`.

        The `default` adapter goes into `save_directory`, any other into `save_directory/<name>`,
        as HF PEFT does. Weights are written atomically. A `state_dict=` keyword (what `Trainer` passes) supplies
        the adapter layers' tensors (see `adapter_state_dict`). Every process computes the tensors, as HF PEFT's
        does, and only the main one writes: a prompt method's are its encoder's output, and under DeepSpeed ZeRO-3
        running the encoder is a forward that every process must take part in.
        """
        if not safe_serialization:
            raise ValueError("petune writes safetensors only (pickle files can run code when loaded)")
        for name in selected_adapters or list(self.peft_config):
            self._check_exists(name)
            tensors = self.adapter_state_dict(name, kwargs.get("state_dict"))
            if not is_main_process:
                continue
            directory = Path(save_directory) if name == "default" else Path(save_directory) / name
            io.save_tensors(tensors, directory / io.WEIGHTS_NAME)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load an adapter folder (petune's or HF PEFT's) onto `model`.

        Args:
            model: the base model the adapter was trained on.
            model_id: the adapter folder (`subfolder` inside it, if given).
            is_trainable: False loads the adapter frozen for inference; True lets training continue.
            allow_pickle: also accept a pickled `adapter_model.bin` (only from a source you trust).
        """
        directory = _adapter_dir(model_id, subfolder)
        config = copy.deepcopy(config) if config is not None else PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        peft_model._load_weights(directory, adapter_name, allow_pickle)
        return peft_model

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: str | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load another adapter folder next to the existing adapters (not activated).

        Into an existing `adapter_name`, only the weights load and its trainability stays (HF PEFT's behaviour, on
        which `Trainer(resume_from_checkpoint=...)` relies).
        """
        directory = _adapter_dir(model_id, subfolder)
        if adapter_name in self.peft_config:
            self._load_weights(directory, adapter_name, allow_pickle)
            return
        config = PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        self._load_weights(directory, adapter_name, allow_pickle)

    def _load_weights(self, directory: Path, adapter_name: str, allow_pickle: bool) -> None:
        assert self._method is not None
        state_dict = io.load_tensors(directory, allow_pickle=allow_pickle)
        config = self.peft_config[adapter_name]
        module = self._adapter_module(adapter_name)
        params = io.layer_parameters(self.base_model, adapter_name, self._method.file_prefix)
        consumed = io.copy_into(params, state_dict)
        consumed |= self._method.load_state_dict(adapter_name, config, module, state_dict)
        ignored = sorted(set(state_dict) - consumed)
        if ignored:
            warnings.warn(
                f"{directory}: ignored {len(ignored)} tensors petune has no place for: {ignored[:5]}",
                stacklevel=3,
            )

    # --- reporting --------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit weight counts its unpacked size, a weight partitioned by
        DeepSpeed ZeRO-3 its whole size (`ds_numel`)."""
        trainable = total = 0
        for param in self.parameters():
            count = getattr(param, "ds_numel", param.numel())
            if param.__class__.__name__ == "Params4bit":
                count *= 2  # two 4-bit values per stored byte
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def train(self, mode: bool = True) -> Self:
        """`nn.Module.train`, keeping petune's kernels on the base model (`kernels.restore` says what removes
        them: transformers' re-kernelisation on a train/eval switch)."""
        patched = kernels.patched_forwards(self.base_model)
        super().train(mode)
        kernels.restore(patched)
        return self

    def __getattr__(self, name: str) -> Any:
        # Anything PeftModel does not define is the base model's (config, device, gradient checkpointing...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules["base_model"]
            return getattr(base, name)


def _adapter_dir(model_id: str | Path, subfolder: str | None) -> Path:
    directory = Path(model_id) / subfolder if subfolder else Path(model_id)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder {directory} does not exist (petune loads adapters from local folders)")
    return directory


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config`; only the adapter trains."""
    return PeftModel(model, peft_config, adapter_name)


# HF PEFT's task-specific classes; petune's one wrapper serves every task type.
PeftModelForCausalLM = PeftModel
PeftModelForSequenceClassification = PeftModel
PeftModelForFeatureExtraction = PeftModel
PeftModelForSeq2SeqLM = PeftModel
PeftModelForTokenClassification = PeftModel

"""Keys and values in front of the caller's tokens, as a transformers `Cache`, and the switches that let such a
cache through gradient checkpointing. Prefix tuning's prefix is trained; prompt tuning's and P-tuning's comes
from running their virtual tokens through the model once per batch (`shared_pass.py`). Also the helpers that
read a call's arguments: its cache, its shape, its labels behind the virtual tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from petune.loss import IGNORE_INDEX

KeyValue = tuple[torch.Tensor, torch.Tensor]  # keys, values: (batch, kv_heads, V, head_dim) each
CACHE_KEYS = ("cache", "past_key_values")  # transformers 5 renamed past_key_values to cache


def find_cache(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(the keyword the caller used, the cache) or (None, None)."""
    for key in CACHE_KEYS:
        if kwargs.get(key) is not None:
            return key, kwargs[key]
    return None, None


def fill(cache: Any, prefix: Sequence[KeyValue]) -> Any:
    """Append each layer's prefix to an empty cache (one `generate` made, or a caller's)."""
    for layer_idx, (keys, values) in enumerate(prefix):
        cache.update(keys, values, layer_idx)
    return cache


def input_shape(kwargs: dict[str, Any]) -> tuple[int, int]:
    """(batch, new tokens) of a call, from `input_ids` or `inputs_embeds`."""
    tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        tokens = kwargs.get("input_ids")
    if tokens is None:
        raise ValueError("prompt methods need input_ids or inputs_embeds")
    return int(tokens.shape[0]), int(tokens.shape[1])


def labels_behind_virtual(labels: torch.Tensor, virtual: int) -> torch.Tensor:
    """(batch, T) token labels -> (batch, V + T), the V virtual positions ignored by the loss."""
    return torch.cat([labels.new_full((labels.shape[0], virtual), IGNORE_INDEX), labels], dim=1)


def attach(model: nn.Module, kwargs: dict[str, Any], prefix: Sequence[KeyValue], keyword: str) -> dict[str, Any]:
    """Give a call that starts a sequence a cache holding `prefix` (under `keyword` unless the caller named one).

    The caller's empty cache is filled (generate() made it: decoding goes on in it); a call that wants a cache
    back gets a new one, filled; one that does not (training, `use_cache=False`) a read-only `PrefixCache`.
    """
    key, given = find_cache(kwargs)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(getattr(model, "config", None), "use_cache", False)
    if given is not None and not isinstance(given, PrefixCache):
        cache = fill(given, prefix)
    elif use_cache and not checkpointing(model):
        cache = fill(DynamicCache(), prefix)
    else:
        cache = PrefixCache(prefix)
    kwargs.pop("past_key_values", None)
    kwargs[key or keyword] = cache
    return kwargs


class PrefixCache(DynamicCache):
    """A cache holding only the prefix and never written: `update` returns prefix + the new states.

    Used by forward passes that keep no cache (training, `use_cache=False`). Running the same layer twice, as
    gradient checkpointing does in the backward pass, sees the same keys; a `DynamicCache` would append twice.
    Its length is the prefix's, so masks and default positions count the virtual tokens.
    """

    def __init__(self, prefix: Sequence[KeyValue]) -> None:
        super().__init__()
        for layer_idx, (keys, values) in enumerate(prefix):
            super().update(keys, values, layer_idx)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer: Any = self.layers[layer_idx]  # a DynamicLayer holding the prefix
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def checkpointing(model: nn.Module) -> bool:
    """True when the next forward of `model` will be gradient-checkpointed (transformers then drops caches)."""
    return torch.is_grad_enabled() and any(
        isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and m.training for m in model.modules()
    )


@contextlib.contextmanager
def cache_through_checkpointing(model: nn.Module, projected: bool) -> Iterator[None]:
    """Within the block, checkpointed layers keep the (read-only) `PrefixCache` they are given.

    transformers drops the cache of a checkpointed layer, because a written cache would be written again when
    the backward pass reruns the layer. A `PrefixCache` is never written, so the layers may keep it: each is
    marked `_can_checkpoint_with_cache` (transformers' switch for layers that only read their cache), and a
    model-level `gradient_checkpointing` flag, which some models (GPT-2) use only to pass `cache=None` down and
    to turn `use_cache` off, is cleared. The layers still checkpoint: they have their own flag.

    Reentrant checkpointing runs a separate backward pass per layer; a prefix computed by a projection MLP
    (`projected`) would be back-propagated through once per layer, which autograd refuses, so that
    combination raises. A prefix that is a view of the trained table works either way.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        yield
        return
    if projected and any(_reentrant(layer) for layer in layers):
        raise ValueError(
            "prefix tuning with prefix_projection=True needs non-reentrant gradient checkpointing, transformers' "
            "default: activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})"
        )
    switches = [
        m
        for m in model.modules()
        if not isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False) is True
    ]
    for layer in layers:
        setattr(layer, "_can_checkpoint_with_cache", True)  # noqa: B010 (an instance attribute, undone below)
    for module in switches:
        setattr(module, "gradient_checkpointing", False)  # noqa: B010
    try:
        yield
    finally:
        for layer in layers:
            delattr(layer, "_can_checkpoint_with_cache")  # the class attribute shows through again
        for module in switches:
            setattr(module, "gradient_checkpointing", True)  # noqa: B010


@contextlib.contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Within the block `model` runs without gradient checkpointing (which would drop the cache it must write)."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        setattr(module, "gradient_checkpointing", False)  # noqa: B010 (an instance flag, set back below)
    try:
        yield
    finally:
        for module in switched:
            setattr(module, "gradient_checkpointing", True)  # noqa: B010


def reentrant_checkpointing(model: nn.Module) -> bool:
    """True when some layer of `model` is checkpointed with `use_reentrant=True`."""
    return any(
        _reentrant(m) for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    )


def _reentrant(layer: nn.Module) -> bool:
    func = getattr(layer, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", {}) or {}
    return bool(keywords.get("use_reentrant", False))

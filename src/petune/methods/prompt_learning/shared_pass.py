"""Prompt tuning and P-tuning on a decoder: the virtual tokens run through the model once per batch, not per row.

The V virtual tokens sit at positions 0..V-1 of every row and a causal model lets them attend only to each
other, so their keys, values, hidden states and logits are the same in every row. A forward pass that starts
sequences therefore runs them as a batch of one and feeds the rows' own tokens behind them through the cache,
the way prefix tuning feeds its prefix: B x V fewer positions through every layer, for the same outputs as
putting the virtual tokens in front of each row's embeddings (logits and hidden states keep their V virtual
positions, broadcast over the batch; the loss includes the last virtual position's prediction of the first
token). Gradients from all rows meet in the one copy and flow back into the encoder.

One difference in training: dropout inside the model draws one mask for the virtual positions, shared by
the rows, where a per-row pass would draw one per row.

Calls that need more than this takes the per-row path: an encoder-decoder or a classifier (bidirectional
models see later tokens from the virtual ones), a cache given by the caller, `output_attentions`, tensor
`logits_to_keep`, `return_dict=False`. Reentrant gradient checkpointing (whose per-layer backward passes
cannot all run back through the one shared pass) takes the packed pass or else the per-row path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from petune.config import TaskType
from petune.methods.prompt_learning.cache import (
    KeyValue,
    attach,
    cache_through_checkpointing,
    checkpointing_off,
    find_cache,
    input_shape,
    labels_behind_virtual,
)
from petune.methods.prompt_learning.config import PromptLearningConfig
from petune.methods.prompt_learning.encoder import VirtualTokenEncoder

if TYPE_CHECKING:
    from petune.methods.prompt_learning.method import PromptLearning


def can_share_virtual_pass(model: nn.Module, config: Any, kwargs: dict[str, Any]) -> bool:
    """Whether this call of `model` may run the virtual tokens once for the whole batch."""
    keep = kwargs.get("logits_to_keep", 0)
    return (
        getattr(config, "task_type", None) == TaskType.CAUSAL_LM
        and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        and find_cache(kwargs)[1] is None
        and not kwargs.get("output_attentions")
        and kwargs.get("return_dict") is not False
        and isinstance(keep, int)
        and (keep == 0 or kwargs.get("labels") is None)
    )


def forward_sharing_virtual_pass(
    method: PromptLearning, config: PromptLearningConfig, encoder: VirtualTokenEncoder, kwargs: dict[str, Any]
) -> Any:
    """The model's output for the caller's tokens behind the virtual ones, the virtual ones run once."""
    model = method.model
    assert config.num_virtual_tokens is not None
    virtual = config.num_virtual_tokens
    batch, new = input_shape(kwargs)
    labels = kwargs.pop("labels", None)
    keep = int(kwargs.get("logits_to_keep", 0))
    virtual_logits = keep == 0 or keep > new  # whether the caller's logits reach into the virtual positions

    kwargs = method.make_room(config, kwargs, feeds_virtual=False)  # checks the length before any forward
    cache = DynamicCache()
    with checkpointing_off(model):  # V positions in a batch of one: little to save by recomputing
        first = model(**_virtual_call(method, encoder, kwargs, cache, keep - new if keep > new else keep))
    layers: list[Any] = list(cache.layers)  # DynamicLayer's: the virtual tokens' keys and values
    prefix: list[KeyValue] = [
        (layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)) for layer in layers
    ]
    kwargs = attach(model, kwargs, prefix, method.cache_keyword())
    with cache_through_checkpointing(model, projected=True):
        rest = model(**kwargs)

    logits = rest.logits
    if logits is not None and virtual_logits:
        logits = torch.cat([first.logits.expand(batch, -1, -1), logits], dim=1)
    hidden_states = rest.get("hidden_states")
    if hidden_states is not None:
        pairs = zip(first.hidden_states, hidden_states, strict=True)
        hidden_states = tuple(torch.cat([a.expand(batch, -1, -1), b], dim=1) for a, b in pairs)
    loss = None
    if labels is not None:
        labels = labels_behind_virtual(labels, virtual)
        loss = model.loss_function(  # type: ignore[operator]
            logits=logits,
            labels=labels,
            vocab_size=model.config.vocab_size,  # type: ignore[union-attr]
            num_items_in_batch=kwargs.get("num_items_in_batch"),
        )
    return type(rest)(**{**rest, "loss": loss, "logits": logits, "hidden_states": hidden_states})


def _virtual_call(
    method: PromptLearning, encoder: VirtualTokenEncoder, kwargs: dict[str, Any], cache: DynamicCache, keep: int
) -> dict[str, Any]:
    """Keyword arguments running the V virtual tokens alone, as a batch of one, writing their keys to `cache`."""
    embeddings = method.model.get_input_embeddings()  # type: ignore[operator]
    weight = embeddings.weight
    prompts = encoder().to(device=weight.device, dtype=weight.dtype).unsqueeze(0)  # (1, V, hidden)
    virtual = prompts.shape[1]
    call: dict[str, Any] = {
        "inputs_embeds": prompts,
        "attention_mask": torch.ones(1, virtual, dtype=torch.long, device=weight.device),
        "position_ids": torch.arange(virtual, device=weight.device).unsqueeze(0),
        method.cache_keyword(): cache,
        "use_cache": True,
        "logits_to_keep": keep,
    }
    if kwargs.get("output_hidden_states"):
        call["output_hidden_states"] = True
    if kwargs.get("token_type_ids") is not None:
        call["token_type_ids"] = torch.zeros(1, virtual, dtype=torch.long, device=weight.device)
    return call

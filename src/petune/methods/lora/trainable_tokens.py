"""`LoraConfig(trainable_token_indices=...)`: train only some rows of an embedding (e.g. new tokens' rows).

As in HF PEFT 0.21, adapter `name` keeps its own copy of the chosen rows, `trainable_tokens_delta`
(n_tokens, dim), started from the current rows; forward uses the weight with those rows replaced (the
stored values replace the rows, they are not added to them). The file key is
`<module>.token_adapter.trainable_tokens_delta`. A list of ids targets the input embedding; a dict
`{module name: ids}` targets each named module (an `nn.Embedding`, or an `nn.Linear` such as `lm_head`).
When the model ties its output layer to the input embedding (`tie_word_embeddings`), the output layer
uses the embedding's rows too and nothing extra is saved for it; a dict naming both tied modules with
different ids trains them separately, as peft does (such an adapter cannot be merged: petune refuses).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petune import targets
from petune.layers import AdapterLayer, replace_module


class TokenRows(nn.Module):
    """The trained rows: `trainable_tokens_delta` (n, dim) and the rows' ids and original values (buffers)."""

    token_indices: torch.Tensor
    trainable_tokens_original: torch.Tensor

    def __init__(self, weight: torch.Tensor, token_indices: list[int]) -> None:
        super().__init__()
        index = torch.tensor(token_indices, dtype=torch.long, device=weight.device)
        self.trainable_tokens_delta = nn.Parameter(weight[index].detach().clone())
        self.register_buffer("token_indices", index, persistent=False)
        self.register_buffer("trainable_tokens_original", weight[index].detach().clone(), persistent=False)

    def weight_with_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (vocab, dim) with the chosen rows replaced by the trained ones (differentiable in them)."""
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))


class TokenAdapter(nn.Module):
    """Adapter `name`'s module in a `TokenRowsLayer`: holds `token_adapter` (HF PEFT's key) or, for a tied
    output layer, a reference to the embedding's (not registered, so it is neither saved nor counted twice)."""

    def __init__(self, rows: TokenRows | None = None, tied_to: TokenRows | None = None) -> None:
        super().__init__()
        if rows is not None:
            self.token_adapter = rows
        self._tied_to = [tied_to] if tied_to is not None else []

    @property
    def rows(self) -> TokenRows:
        return self._tied_to[0] if self._tied_to else self.token_adapter


class TokenRowsLayer(AdapterLayer):
    """Wraps an `nn.Embedding` (or a tied `nn.Linear` output layer) whose chosen rows an adapter replaces."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: list[str] = []

    def forward_adapter(self, name: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if name is None or name in self.merged or (self.merged and name not in self.merged):
            return self.base_layer(x, *args, **kwargs)
        adapter: TokenAdapter = self.adapters[name]  # type: ignore[assignment]
        weight = adapter.rows.weight_with_rows(self.base_layer.weight)  # type: ignore[arg-type]
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)
            scale = getattr(base, "embed_scale", None)
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        return F.linear(x, weight, getattr(base, "bias", None))

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Write adapter `name`'s rows into the weight (a tied layer shares the weight: nothing to do)."""
        adapter: TokenAdapter = self.adapters[name]  # type: ignore[assignment]
        if not adapter._tied_to:
            weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
            weight.copy_(adapter.rows.weight_with_rows(weight))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original rows back, most recent merge first."""
        while self.merged:
            adapter: TokenAdapter = self.adapters[self.merged.pop()]  # type: ignore[assignment]
            if not adapter._tied_to:
                rows = adapter.rows
                weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
                weight.index_copy_(0, rows.token_indices, rows.trainable_tokens_original.to(weight.dtype))


def _layer_at(model: nn.Module, module_name: str) -> TokenRowsLayer:
    module = model.get_submodule(module_name)
    if isinstance(module, TokenRowsLayer):
        return module
    if not isinstance(module, nn.Embedding | nn.Linear):
        raise ValueError(
            f"trainable_token_indices names {module_name!r}, a {type(module).__name__}; it must be an "
            "nn.Embedding (or a tied nn.Linear output layer)"
        )
    layer = TokenRowsLayer(module)
    replace_module(model, module_name, layer)
    return layer


def _resolve(model: nn.Module, name: str) -> str:
    """The qualified name of the module `name` (exact or a `.`-suffix) refers to, or a clear error."""
    found = [n for n, _ in model.named_modules() if n and targets.is_module_to_save([name], n)]
    found = [n for n in found if ".base_layer" not in n and ".adapters." not in n]
    if not found:
        raise ValueError(f"trainable_token_indices names {name!r}, which matches no module of {type(model).__name__}")
    return found[0]


def _input_embedding_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if isinstance(embedding, TokenRowsLayer):
        embedding = embedding.base_layer
    for module_name, module in model.named_modules():
        if embedding is not None and module is embedding:
            return module_name.removesuffix(".base_layer")
    return _resolve(model, "embed_tokens")


def _tied_output_name(model: nn.Module) -> str | None:
    """The output layer's name when the model ties it to the input embedding, else None."""
    config = getattr(model, "config", None)
    get = getattr(model, "get_output_embeddings", None)
    if not getattr(config, "tie_word_embeddings", False) or get is None or get() is None:
        return None
    output = get()
    output = output.base_layer if isinstance(output, TokenRowsLayer) else output
    return next((n.removesuffix(".base_layer") for n, m in model.named_modules() if m is output), None)


def add_token_rows(
    model: nn.Module, adapter_name: str, indices: list[int] | dict[str, list[int]], modules_to_save: Any
) -> None:
    """Give adapter `adapter_name` trainable rows `indices` (ids, or `{module name: ids}`) as HF PEFT does."""
    if isinstance(indices, dict):
        named = dict(indices)
        wanted = {_resolve(model, key): list(ids) for key, ids in named.items()}
    else:
        named = {"embed_tokens": list(indices)}
        wanted = {_input_embedding_name(model): list(indices)}
    clash = [key for key in named if modules_to_save and key in modules_to_save]
    if clash:
        raise ValueError(
            f"{clash[0]!r} is both in modules_to_save (trained in full) and in trainable_token_indices "
            "(some rows trained): keep it in one of them"
        )
    embedding, tied = _input_embedding_name(model), _tied_output_name(model)
    if tied is not None and tied in wanted and wanted.get(embedding) == wanted[tied]:
        del wanted[tied]  # the tied output layer follows the embedding's rows
    for module_name, ids in wanted.items():
        layer = _layer_at(model, module_name)
        weight: torch.Tensor = layer.base_layer.weight  # type: ignore[assignment]
        bad = [i for i in ids if not 0 <= i < weight.shape[0]]
        if bad:
            raise ValueError(
                f"trainable_token_indices for {module_name!r} has ids {bad[:5]} outside 0..{weight.shape[0] - 1} "
                "(resize the embeddings first for new tokens)"
            )
        layer.adapters[adapter_name] = TokenAdapter(TokenRows(weight, ids))
    if tied is not None and embedding in wanted and tied not in wanted:
        source: TokenAdapter = model.get_submodule(embedding).adapters[adapter_name]  # type: ignore[index,assignment]
        _layer_at(model, tied).adapters[adapter_name] = TokenAdapter(tied_to=source.rows)


def token_rows_layers(model: nn.Module) -> list[TokenRowsLayer]:
    return [m for m in model.modules() if isinstance(m, TokenRowsLayer)]


def check_token_rows_mergeable(model: nn.Module, names: list[str]) -> None:
    """Refuse to merge an adapter with separate rows for two modules sharing one weight (tied embeddings with
    different ids): one merged weight cannot hold both (HF PEFT merges them anyway, and the outputs change)."""
    for name in names:
        owners: dict[int, int] = {}
        for layer in token_rows_layers(model):
            if name not in layer.adapters:
                continue
            adapter = layer.adapters[name]
            if isinstance(adapter, TokenAdapter) and not adapter._tied_to:
                key = id(layer.base_layer.weight)
                owners[key] = owners.get(key, 0) + 1
        if any(count > 1 for count in owners.values()):
            raise ValueError(
                f"adapter {name!r} trains different rows of two modules that share one (tied) weight; merged, "
                "one would overwrite the other: keep it unmerged, or give both modules the same ids"
            )


def merge_token_rows(model: nn.Module, names: list[str]) -> None:
    """Write these adapters' trained rows into the embedding weights (`merge_adapter`)."""
    for layer in token_rows_layers(model):
        for name in names:
            if name in layer.adapters:
                layer.merge(name)


def unmerge_token_rows(model: nn.Module) -> None:
    for layer in token_rows_layers(model):
        layer.unmerge()

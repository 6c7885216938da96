"""`PromptLearning`: what prompt tuning, P-tuning and prefix tuning share.

Every sequence the model sees starts with V virtual positions that the caller never sees. Callers pass
`input_ids`, `attention_mask`, `position_ids` and `labels` for their own tokens; `prepare_inputs` turns them
into the model's view of the sequence, whatever the call:

- the first call of a sequence (no cache, or an empty one) puts the virtual tokens in: as input embeddings
  (prompt tuning, P-tuning: `virtual_tokens_in_input`) or as keys and values in the cache (prefix tuning);
- a later call with a filled cache (decoding) only shifts the mask and positions: the cache holds them already.

The attention mask gets V ones in front. Positions: virtual tokens take 0..V-1 and real tokens continue at V,
counted over the attention mask so that left padding does not shift them (HF PEFT 0.21 drops the caller's
`position_ids` for prompt tuning and P-tuning, and for an unpadded row this gives the same positions as it
does). Token labels get V entries of -100 in front, so the logits keep their V virtual positions, as in HF PEFT
(the last virtual position then predicts the caller's first token, which the loss includes).

On a decoder, `forward` runs prompt tuning's and P-tuning's virtual tokens once per batch and the rows behind them
through the cache (`shared_pass.py`): the same outputs for B x V fewer positions through every layer.

`generate` runs the base model's own `generate` with a forward pre-hook that applies `prepare_inputs` to every
step, so greedy, sampling and beam search (which expands the batch first), with or without a cache, all see the
same sequence a plain forward pass over the row does.

Saving writes HF PEFT's one tensor, `prompt_embeddings` (the encoder's output), and, when the encoder is more
than that table (P-tuning's MLP or LSTM, prefix tuning's projection), its weights as `prompt_encoder.<name>`:
HF PEFT loads with `strict=False` and ignores those keys, petune loads them so training can resume.

Where HF PEFT 0.21 (with transformers 5) breaks, measured on the tiny models of the tests:
- `generate()` on a left-padded batch: its positions count the padding, so tokens differ from a plain forward
  over the row (logit gaps up to 0.4 on GPT-2, with or without a cache; prefix tuning on Llama even without);
- the caller's `position_ids` are dropped with a warning (prompt tuning, P-tuning);
- sequence classification reads the last position of the embeddings it passes, a pad token in a right-padded
  row (logit error 0.15 on Llama); petune moves such padding to the left first;
- `PeftModel.from_pretrained(..., is_trainable=True)` raises for prompt methods, and only the encoder's output is
  saved, so P-tuning and projected prefix tuning cannot resume training.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from petune.config import PeftConfig, TaskType
from petune.methods.base import Method
from petune.methods.prompt_learning.cache import (
    find_cache,
    input_shape,
    labels_behind_virtual,
    reentrant_checkpointing,
)
from petune.methods.prompt_learning.config import PromptLearningConfig, model_sizes
from petune.methods.prompt_learning.encoder import VirtualTokenEncoder
from petune.methods.prompt_learning.packed_pass import can_pack, forward_packed, restore_attention
from petune.methods.prompt_learning.shared_pass import can_share_virtual_pass, forward_sharing_virtual_pass

ENCODER_PREFIX = "prompt_encoder."  # file keys of the encoder weights petune saves to resume training


class PromptLearning(Method):
    """Shared by the prompt methods; subclasses choose the encoder and where the virtual tokens go."""

    config_class: type[PeftConfig] = PromptLearningConfig
    file_prefix = "base_model."  # HF PEFT keeps a prompt model's modules_to_save under base_model.<module>
    virtual_tokens_in_input = True  # False: the virtual tokens live only in the attention cache (prefix tuning)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.sizes = model_sizes(model)
        self._forward_params = list(inspect.signature(model.forward).parameters)

    # --- what subclasses define ------------------------------------------------------------------------

    def expected_sizes(self) -> dict[str, int]:
        """The config's size fields for this model (`num_layers`, `token_dim`, `num_attention_heads`)."""
        return {
            "num_layers": self.sizes.num_layers,
            "token_dim": self.sizes.hidden_size,
            "num_attention_heads": self.sizes.num_heads,
        }

    def token_shape(self, num_layers: int, token_dim: int, num_attention_heads: int) -> tuple[int, ...]:
        """The shape of one virtual token given the size fields (how the error messages describe it)."""
        return (token_dim,)

    def build_encoder(self, config: PromptLearningConfig) -> VirtualTokenEncoder:
        raise NotImplementedError

    # --- the Method hooks ------------------------------------------------------------------------------

    def add(self, name: str, config: PeftConfig) -> nn.Module:
        assert isinstance(config, PromptLearningConfig)
        self._fill_sizes(config)
        device = self.model.get_input_embeddings().weight.device  # type: ignore[operator]
        return self.build_encoder(config).to(device)

    def _fill_sizes(self, config: PromptLearningConfig) -> None:
        """Set the config's size fields from the model, or check that a loaded config's match it."""
        expected = self.expected_sizes()
        given = {key: getattr(config, key) for key in expected}
        if any(value is not None and value != expected[key] for key, value in given.items()):
            filled = {key: expected[key] if value is None else value for key, value in given.items()}
            raise ValueError(
                f"this {config.peft_type} adapter does not fit {type(self.model).__name__}: its virtual tokens have "
                f"shape {self.token_shape(**filled)} ({_describe(filled)}), the model needs "
                f"{self.token_shape(**expected)} ({_describe(expected)})"
            )
        for key, value in expected.items():
            setattr(config, key, value)
        config.num_transformer_submodules = 1

    def forward(
        self, name: str, config: PeftConfig, module: nn.Module | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The model's forward; a decoder runs prompt tuning's and P-tuning's virtual tokens once per batch.

        Training steps run them packed with the rows into one sequence (`packed_pass.py`), other calls as a
        batch of one in front of the rows (`shared_pass.py`), or, where neither applies, in front of every row.
        """
        kwargs = self._keywords(args, kwargs)
        if self.virtual_tokens_in_input and can_share_virtual_pass(self.model, config, kwargs):
            assert isinstance(config, PromptLearningConfig) and isinstance(module, VirtualTokenEncoder)
            if can_pack(self.model, kwargs):
                return forward_packed(self, config, module, kwargs)
            if not reentrant_checkpointing(self.model):
                return forward_sharing_virtual_pass(self, config, module, kwargs)
        return super().forward(name, config, module, (), kwargs)

    def unload(self) -> None:
        restore_attention(self.model)

    def prepare_inputs(
        self,
        name: str,
        config: PeftConfig,
        module: nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert isinstance(config, PromptLearningConfig) and isinstance(module, VirtualTokenEncoder)
        kwargs = self._keywords(args, kwargs)
        starts = self.past_length(find_cache(kwargs)[1]) == 0
        kwargs = self.make_room(config, kwargs, feeds_virtual=starts and self.virtual_tokens_in_input)
        if starts:
            kwargs = self.insert_virtual_tokens(config, module, kwargs, input_shape(kwargs)[0])
        return (), kwargs

    def make_room(self, config: PromptLearningConfig, kwargs: dict[str, Any], feeds_virtual: bool) -> dict[str, Any]:
        """The attention mask and positions of a call with V virtual tokens in front of the caller's.

        `feeds_virtual`: the call itself feeds the V virtual tokens as inputs (else they are in the cache).
        """
        assert config.num_virtual_tokens is not None
        virtual = config.num_virtual_tokens
        past = self.past_length(find_cache(kwargs)[1])
        seen = 0 if past == 0 else past - virtual  # the caller's tokens already in the cache
        new = input_shape(kwargs)[1]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = kwargs["attention_mask"] = _with_virtual_ones(mask, virtual, seen, new)
        given = kwargs.get("position_ids")
        positions = self._positions(given, mask, virtual, new, feeds_virtual)
        if positions is not None:
            kwargs["position_ids"] = positions
        self._check_length(virtual, seen + new, positions if given is not None else None)
        return kwargs

    def _positions(
        self, given: torch.Tensor | None, mask: torch.Tensor | None, virtual: int, new: int, with_virtual: bool
    ) -> torch.Tensor | None:
        """The model's position ids for this call: virtual tokens 0..V-1, the caller's from V on.

        None (no mask, no positions given) lets the model count from its cache length, which is the same.
        """
        if given is not None:
            given = given + virtual
            if with_virtual:
                leading = torch.arange(virtual, device=given.device).expand(given.shape[0], virtual)
                given = torch.cat([leading, given], dim=-1)
            return given
        if mask is None:
            return None
        fed = new + virtual if with_virtual else new
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -fed:]  # padding does not advance positions

    def insert_virtual_tokens(
        self, config: PromptLearningConfig, encoder: VirtualTokenEncoder, kwargs: dict[str, Any], batch: int
    ) -> dict[str, Any]:
        """Put the virtual tokens in front of the input embeddings (the first call of a sequence)."""
        virtual = encoder.embedding.num_embeddings
        embeds, prompts = self.take_embeddings(encoder, kwargs)
        kwargs["inputs_embeds"] = torch.cat([prompts.expand(batch, -1, -1), embeds], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and config.task_type != TaskType.SEQ_CLS:
            kwargs["labels"] = labels_behind_virtual(labels, virtual)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(token_types.shape[0], virtual), token_types], 1)
        if config.task_type == TaskType.SEQ_CLS and kwargs.get("attention_mask") is not None:
            _move_padding_left(kwargs)
        return kwargs

    def take_embeddings(
        self, encoder: VirtualTokenEncoder, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pop the call's `inputs_embeds` or `input_ids`: (its embeddings (B, T, H), the virtual tokens (V, H))."""
        embeds = kwargs.pop("inputs_embeds", None)
        input_ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)  # type: ignore[operator]
        return embeds, encoder().to(device=embeds.device, dtype=embeds.dtype)

    def past_length(self, cache: Any) -> int:
        """Tokens (virtual ones included) already in `cache`; 0 starts a new sequence."""
        return 0 if cache is None else int(cache.get_seq_length())

    def generate(self, name: str, config: PeftConfig, module: nn.Module | None, kwargs: dict[str, Any]) -> torch.Tensor:
        assert isinstance(config, PromptLearningConfig) and config.num_virtual_tokens is not None
        generation_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        cache_kind = kwargs.get("cache_implementation") or getattr(generation_config, "cache_implementation", None)
        if cache_kind not in (None, "dynamic", "offloaded"):
            raise ValueError(
                f"cache_implementation={cache_kind!r} is not supported with prompt methods: generate() sizes such a "
                f"cache for the caller's tokens, without room for the {config.num_virtual_tokens} virtual ones"
            )
        if kwargs.get("max_new_tokens") is not None and kwargs.get("input_ids") is not None:
            mask = kwargs.get("attention_mask")
            longest = int(mask.sum(-1).max()) if mask is not None else kwargs["input_ids"].shape[1]
            self._check_length(config.num_virtual_tokens, longest + int(kwargs["max_new_tokens"]))

        def every_step(_model: nn.Module, args: tuple[Any, ...], step_kwargs: dict[str, Any]) -> Any:
            return self.prepare_inputs(name, config, module, args, step_kwargs)

        handle = self.model.register_forward_pre_hook(every_step, with_kwargs=True)
        try:
            return super().generate(name, config, module, kwargs)
        finally:
            handle.remove()

    def state_dict(self, name: str, config: PeftConfig, module: nn.Module | None) -> dict[str, torch.Tensor]:
        """HF PEFT's `prompt_embeddings` (the encoder's output), plus the encoder's weights when it has more."""
        assert isinstance(module, VirtualTokenEncoder)
        # copies, read before the encoder runs: under DeepSpeed ZeRO-3 running it frees its gathered weights,
        # and under FSDP2 they live in the engine's gathering buffer, which cannot be written out as such. Read as
        # parameters, not `state_dict()`: FSDP2's state-dict hook would put the sharded DTensors back in place.
        live = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        weights = {ENCODER_PREFIX + k: v.detach().clone() for k, v in live.items()}
        return {"prompt_embeddings": module.outputs().clone(), **(weights if module.reparameterized else {})}

    def load_state_dict(
        self, name: str, config: PeftConfig, module: nn.Module | None, state_dict: dict[str, torch.Tensor]
    ) -> set[str]:
        """Load the encoder's weights when the file has them; otherwise hold `prompt_embeddings` directly.

        A file written by HF PEFT has only `prompt_embeddings`: the encoder then becomes a plain table of those
        virtual tokens, so the logits are the same and `is_trainable=True` trains the tokens themselves.
        """
        assert isinstance(config, PromptLearningConfig) and isinstance(module, VirtualTokenEncoder)
        saved = state_dict.get("prompt_embeddings")
        if saved is None:
            raise ValueError(f"the adapter file has no 'prompt_embeddings' tensor (keys: {sorted(state_dict)[:5]})")
        expected = tuple(module.outputs().shape)
        if tuple(saved.shape) != expected:
            raise ValueError(
                f"'prompt_embeddings' has shape {tuple(saved.shape)} in the adapter file, but {expected} "
                f"(num_virtual_tokens, token width) for this model: the adapter was made for a different base model"
            )
        encoder_keys = {key for key in state_dict if key.startswith(ENCODER_PREFIX)}
        if module.reparameterized and encoder_keys:
            weights = {key.removeprefix(ENCODER_PREFIX): state_dict[key] for key in encoder_keys}
            try:
                module.load_state_dict(weights, strict=True)
            except RuntimeError as error:
                raise ValueError(f"the adapter file's encoder weights do not fit this encoder: {error}") from None
        elif module.reparameterized:
            module.hold_outputs(saved)
        else:
            with torch.no_grad():
                module.embedding.weight.copy_(saved)
        return {"prompt_embeddings", *encoder_keys}

    # --- helpers ---------------------------------------------------------------------------------------

    def _keywords(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name (positional ones named after the model's forward)."""
        named = dict(zip(self._forward_params, args, strict=False))
        clash = sorted(set(named) & set(kwargs))
        if clash:
            raise TypeError(f"forward() got multiple values for {clash}")
        return {**named, **kwargs}

    def cache_keyword(self) -> str:
        """The name of the model's cache argument (transformers 5 renamed `past_key_values` to `cache`)."""
        return "cache" if "cache" in self._forward_params else "past_key_values"

    def _check_length(self, virtual: int, tokens: int, given_positions: torch.Tensor | None = None) -> None:
        """Refuse a call whose positions run past `max_position_embeddings` (GPT-2's table would overflow).

        Positions counted over the mask stay below virtual + tokens, so only positions a caller gave (shifted by
        V) are read, which costs a device sync.
        """
        limit = self.sizes.max_positions
        if limit is None:
            return
        if given_positions is not None:
            tokens = max(tokens, int(given_positions.max()) + 1 - virtual)
        if virtual + tokens > limit:
            raise ValueError(
                f"{virtual} virtual tokens + {tokens} input tokens = {virtual + tokens} positions, more than the "
                f"model's max_position_embeddings={limit}: shorten the input or use fewer virtual tokens"
            )


def _with_virtual_ones(mask: torch.Tensor, virtual: int, seen: int, new: int) -> torch.Tensor:
    """The caller's (batch, seen + new) mask with V ones in front."""
    if mask.dim() != 2:
        raise ValueError(f"prompt methods need a 2D attention_mask (batch, tokens), got shape {tuple(mask.shape)}")
    if mask.shape[1] != seen + new:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; prompt methods need (batch, {seen + new}): one entry "
            f"per token of the caller's sequence ({seen} cached + {new} new), without virtual tokens"
        )
    return torch.cat([mask.new_ones(mask.shape[0], virtual), mask], dim=1)


def _move_padding_left(kwargs: dict[str, Any]) -> None:
    """Reorder each row so padding comes first: classifier heads read the last position when given embeddings.

    transformers' `...ForSequenceClassification` finds the last real token from `input_ids`; prompt methods pass
    `inputs_embeds`, so it takes the last position, which a right-padded row fills with padding.
    """
    mask = kwargs["attention_mask"]
    order = torch.sort(mask, dim=1, stable=True).indices  # zeros (padding) first, token order kept
    embeds = kwargs["inputs_embeds"]
    kwargs["inputs_embeds"] = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    kwargs["attention_mask"] = mask.gather(1, order)
    for key in ("position_ids", "token_type_ids"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key].expand(mask.shape[0], -1).gather(1, order)


def _describe(sizes: dict[str, int]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sizes.items())

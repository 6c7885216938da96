"""The training forward with `labels=`: petune's chunked loss (`petune.loss`), without the full logits.

A user's own loop, `loss = model(**batch, labels=labels).loss; loss.backward()`, would have the base model
compute (batch, seq, vocab) logits and a cross-entropy over them: for SmolLM2 at 4 x 256 tokens that is 200 MB
of fp32 logits plus their softmax and gradient, the largest tensors of the step. In training mode a
`PeftModel` computes that loss with `petune.loss.causal_lm_loss` instead (logits one chunk of labelled
positions at a time, never all at once) and returns an output without logits: `out.logits` raises an error
that says how to get them. The loss and its gradients are the model's own to rounding (tests/test_loss_only.py).

Full logits, and the model's own loss, come back:
- in evaluation mode (`model.eval()`: what transformers' `Trainer.prediction_step` and `evaluate` run);
- with `model.return_logits = True` (petune's switch; False by default);
- whenever the call asks for something this path does not compute: hidden states, attentions, a past cache,
  `logits_to_keep`, `shift_labels`, `return_dict=False`, a MoE router loss, TRL's `fused_lm_head=True` (TRL's
  own loss and token-accuracy metrics, which read its log-probabilities), or a model that changes its logits
  after the head (soft-capping, logit scaling), or any task but a causal LM's.

A loop that writes `loss = model(**batch, labels=labels).loss` keeps last step's loss, and with it last step's
autograd graph, until the next forward has returned: after backward the graph holds no tensors, but its nodes are
thousands of small allocations left among the freed activations, and on glibc's malloc the next step's activations
then fit between them badly (SmolLM2 LoRA, 4 x 256 tokens in bf16, 8 steps: glibc's heap 985 MB and peak RSS
1494 MB kept, 817 and 1325 MB released; `python benchmarks/heap_growth.py --variant keep-graph`, BENCHMARKS.md).
So the next such forward detaches the previous loss it returned in place (`loss.detach_()`), once a backward has
freed that graph (with `retain_graph=True`, or before any backward, it is left alone): its value is kept, only its
`grad_fn` goes, which a spent graph could not run again anyway. `model.detach_spent_loss = False` turns this off.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from petune.loss import causal_lm_loss, transforms_logits

NO_LOGITS = (
    "this petune model computed the loss without the full logits (training mode with labels=); "
    "set model.return_logits = True, or call model.eval(), to get them"
)
# Forward arguments that ask for more than the loss: with any of them set, the model's own forward runs.
_NEEDS_FULL_FORWARD = (
    "fused_lm_head",  # TRL's fused LM head: its own loss and metrics
    "logits_to_keep",
    "shift_labels",
    "output_hidden_states",
    "output_attentions",
    "output_router_logits",
    "past_key_values",
)
_CONFIG_FLAGS = ("output_hidden_states", "output_attentions", "output_router_logits")


@dataclass
class LossOnlyOutput(CausalLMOutputWithPast):
    """A causal LM's output with the loss only: reading `.logits` raises `NO_LOGITS` (an AttributeError, so
    `getattr(out, "logits", None)` is None), rather than handing code a None it might skip over."""

    def __getattribute__(self, name: str) -> Any:
        if name == "logits" and object.__getattribute__(self, "__dict__").get("_sealed"):
            raise AttributeError(NO_LOGITS)
        return super().__getattribute__(name)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_sealed", True)


class _Watch(torch.autograd.Function):
    """The loss, copied (one number); the input kept for backward serves as a marker that autograd frees with
    the rest of the graph's saved tensors, which `spent` reads."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


_returned: weakref.WeakKeyDictionary[nn.Module, weakref.ref[torch.Tensor]] = weakref.WeakKeyDictionary()


def spent(loss: torch.Tensor) -> bool:
    """Whether `loss` came from `watched` and a backward has since freed its graph."""
    node = loss.grad_fn
    if node is None or not isinstance(node, _Watch._backward_cls):
        return False
    try:
        node.saved_tensors  # type: ignore[attr-defined]  # noqa: B018 (raises once a backward has freed them)
    except RuntimeError:
        return True
    return False


def release_spent(model: nn.Module) -> None:
    """Detach the last loss `model` returned (`watched`) if a backward has freed its graph; called as a forward
    starts, before it allocates anything (see the module's doc); nothing while `model.detach_spent_loss` is False."""
    previous = _returned.get(model) if getattr(model, "detach_spent_loss", True) else None
    loss = previous() if previous is not None else None
    if loss is not None and spent(loss):  # not spent yet: left for a later forward to look at again
        loss.detach_()


def watched(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """`loss`, remembered as the last loss `model` returned, for the next forward's `release_spent`; `loss` itself
    when `model.detach_spent_loss` is False or it needs no gradient."""
    if not getattr(model, "detach_spent_loss", True) or not loss.requires_grad:
        return loss
    out: torch.Tensor = _Watch.apply(loss)
    _returned[model] = weakref.ref(out)
    return out


def computes_loss_only(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether `model(*args, **kwargs)` (a `PeftModel`'s forward) may run as `loss_only_forward`."""
    if getattr(model, "return_logits", True) or not model.training or len(args) > 1:
        return False
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or kwargs.get("return_dict") is False:
        return False
    if any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in _NEEDS_FULL_FORWARD):
        return False
    base = model.get_base_model()  # type: ignore[operator]
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) for name in _CONFIG_FLAGS):
        return False
    if transforms_logits(config):
        return False
    config_of_adapter = model.peft_config.get(model.active_adapter)  # type: ignore[union-attr,operator]
    task_type = getattr(config_of_adapter, "task_type", None)
    causal = task_type == "CAUSAL_LM" or (task_type is None and type(base).__name__.endswith("ForCausalLM"))
    return causal and _has_decoder_and_head(base)


def _has_decoder_and_head(base: nn.Module) -> bool:
    try:
        return base.get_decoder() is not None and base.get_output_embeddings() is not None  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return False


def loss_only_forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LossOnlyOutput:
    """The mean next-token loss of `kwargs["labels"]` under `model`, as the model's own `labels=` loss computes it
    (`num_items_in_batch`, which transformers' `Trainer` passes: the sum over that many labels instead)."""
    batch = {k: v for k, v in kwargs.items() if k not in ("num_items_in_batch", "use_cache", "return_dict")}
    if args:
        batch["input_ids"] = args[0]
    loss = causal_lm_loss(model, batch, num_items=kwargs.get("num_items_in_batch"))
    return LossOnlyOutput(loss=loss)

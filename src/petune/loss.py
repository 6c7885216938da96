"""Next-token loss that never materialises the full logits.

A causal LM's logits are (batch, seq, vocab) floats: for SmolLM2 (vocab 49,152) a batch of 4 x 256
tokens is 200 MB in fp32, and the loss keeps two more copies (log-softmax and its gradient). Only the
positions that carry a label need logits at all (with completion-only training, often a minority),
and those are computed a chunk at a time. With the usual frozen head, each chunk's gradient with
respect to the hidden states is computed right away and its logits are dropped (no recomputation);
a trained or wrapped head recomputes each chunk's logits in backward instead. The result is the same
mean cross-entropy HF models compute from `labels=`, with the same gradients (tests/test_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from petune.kernels import native

IGNORE_INDEX = -100
# Label positions whose logits one chunk computes, in one (rows, vocab) fp32 buffer that every chunk reuses (48 MiB
# for SmolLM2's 49,152 words), turned into the softmax and the logits' gradient in place. The loss of 1020
# positions on SmolLM2's head by chunk size (`python benchmarks/loss_chunk.py`, medians of 7 interleaved runs):
# fp32 128 rows 857 ms, 256 817 ms, 512 734 ms; bf16 416, 399, 408 ms. With the buffer reused, 256 rows peak
# where 128 fresh buffers a step did (benchmarks/run.py, LoRA: fp32 1745 vs 1742 MB, bf16 1198 vs 1190 MB).
CHUNK_SIZE = 256
# Config fields of models whose logits are not just the head's output (Gemma 2's soft-capping, Cohere's and
# Granite's scaling): their loss is not the chunked loss of the head's output.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def causal_lm_loss(
    model: nn.Module,
    batch: dict[str, Any],
    chunk_size: int = CHUNK_SIZE,
    num_items: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `batch["labels"]` (shifted by one, -100 ignored) under `model`.

    Args:
        model: a transformers causal LM or a `PeftModel` around one.
        batch: the forward's keyword arguments plus `labels` (batch, seq).
        chunk_size: label positions whose logits are computed at once.
        num_items: divide the summed loss by this (e.g. the label count of a whole accumulated batch)
            instead of this batch's label count.
    """
    labels: torch.Tensor = batch["labels"]
    inputs = without_right_padding_mask({k: v for k, v in batch.items() if k != "labels"}, labels)
    inner = model.module if isinstance(model, DistributedDataParallel) else model  # DDP: hooks go on the model
    decoder: nn.Module = inner.get_decoder()  # type: ignore[operator]
    head: nn.Module = inner.get_output_embeddings()  # type: ignore[operator]
    captured: list[torch.Tensor] = []

    def keep_hidden(_module: nn.Module, _args: Any, output: Any) -> Any:
        """Keep the decoder's hidden states; hand the model's own head a contiguous copy of the last position.

        The head would read `hidden[:, -1:]`, a strided view, which a bf16 linear layer on CPU turns into a
        batched matmul over a (batch, hidden, vocab) copy of its weight: ~200 ms for SmolLM2 at batch 4, where
        the contiguous copy takes ~4 ms (fp32: 20 vs 17 ms).
        """
        if isinstance(output, tuple):
            captured.append(output[0])
            return (output[0][:, -1:].contiguous(), *output[1:])
        captured.append(output.last_hidden_state)
        output.last_hidden_state = output.last_hidden_state[:, -1:].contiguous()
        return output

    if _sharded(head):
        if _head_runs_alone(inner, head):
            return _loss_inside_head(model, head, inputs, labels, chunk_size, num_items)
        return _loss_from_logits(model, inputs, labels, num_items)
    hook = decoder.register_forward_hook(keep_hidden)
    try:
        # logits_to_keep=1: the model's own head runs on one position only; we do the rest below.
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    # (B, T', H); T' > T with a prompt method's virtual tokens, which may run as a batch of one first
    hidden = captured[-1]
    if len(captured) > 1:
        hidden = torch.cat([piece.expand(hidden.shape[0], -1, -1) for piece in captured], dim=1)
    total, count = _summed_loss(head, hidden, labels, chunk_size)
    return total / max(num_items if num_items is not None else count, 1)


def _summed_loss(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, labelled positions) of the head over `hidden` (B, T', H) against `labels` (B, T)."""
    if hidden.shape[1] > labels.shape[1]:
        labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
    shift_labels = labels[:, 1:].to(hidden.device)
    keep = shift_labels != IGNORE_INDEX
    selected = hidden[:, :-1][keep]  # (N, H)
    targets = shift_labels[keep]  # (N,)
    if targets.numel() == 0:
        return hidden.sum() * 0.0, 0
    if _frozen_linear(head):
        return _FrozenHeadCrossEntropy.apply(selected, head.weight, head.bias, targets, chunk_size), targets.numel()
    # a trained or wrapped head: recompute each chunk's logits in backward instead
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, head, selected[piece], targets[piece], use_reentrant=False)
    return total, targets.numel()


def _sharded(head: nn.Module) -> bool:
    """Whether the head's weight is a shard (DeepSpeed ZeRO-3, torch FSDP2), whole only inside the forward."""
    weight = getattr(head, "weight", None)
    return hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor"


def _head_runs_alone(model: nn.Module, head: nn.Module) -> bool:
    """Whether the model's forward returns its frozen linear head's one output as its logits, unchanged: not a
    prompt method (whose shared pass runs the head twice), not soft-capped or scaled logits, no patched head."""
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False) or "forward" in vars(head):
        return False
    get_base = getattr(model, "get_base_model", None)
    if transforms_logits(getattr(get_base() if get_base is not None else model, "config", None)):
        return False
    return _frozen_linear(head)


def transforms_logits(config: Any) -> bool:
    """Whether a model of this config changes its head's output before it is the logits (`LOGIT_TRANSFORMS`)."""
    return any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def _frozen_linear(head: nn.Module) -> bool:
    """A frozen `nn.Linear` (also when FSDP2 made it a subclass of its own, which keeps `Linear.forward`)."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward and not head.weight.requires_grad


def _loss_inside_head(
    model: nn.Module,
    head: nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    chunk_size: int,
    num_items: int | None,
) -> torch.Tensor:
    """The chunked loss under a sharding engine, where the head's weight is whole only while the model's forward
    runs (DeepSpeed ZeRO-3 gathers it around the head's call, FSDP2 around the root module's): the loss runs as
    the head's forward, and the model hands its (1, 1) sum back as its logits. Its backward needs no weight (the
    frozen head's input gradient is computed in the forward), and no (batch, seq, vocab) logits exist."""
    counts: list[int] = []

    def summed_loss(hidden: torch.Tensor) -> torch.Tensor:
        total, count = _summed_loss(head, hidden, labels, chunk_size)
        counts.append(count)
        return total.reshape(1, 1)

    head.forward = summed_loss
    try:
        total = model(**inputs, use_cache=False).logits
    finally:
        del head.forward
    if len(counts) != 1 or total.shape != (1, 1):
        raise RuntimeError(f"the model ran its head {len(counts)} times or changed its output {tuple(total.shape)}")
    return total.reshape(()) / max(num_items if num_items is not None else counts[0], 1)


def _loss_from_logits(
    model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, num_items: int | None
) -> torch.Tensor:
    """The same loss from the model's own logits at every position: under a sharding engine the head's weight
    is gathered for the model's forward and backward only, so the head must run inside them."""
    logits = model(**inputs, use_cache=False).logits  # (B, T', V); T' > T with a prompt method's virtual tokens
    if logits.shape[1] > labels.shape[1]:
        labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
    shift_labels = labels[:, 1:].to(logits.device)
    keep = shift_labels != IGNORE_INDEX
    targets = shift_labels[keep]
    total = F.cross_entropy(logits[:, :-1][keep].float(), targets, reduction="sum")
    return total / max(num_items if num_items is not None else int(targets.numel()), 1)


def without_right_padding_mask(inputs: dict[str, Any], labels: torch.Tensor) -> dict[str, Any]:
    """`inputs` without their attention mask when it only marks right padding that no label depends on.

    In a causal model a position sees only earlier ones, so with every row's padding at its end each real
    position attends to real positions only, mask or not; only the padded positions' outputs change, and a
    label is scored from the output before it. So when no label follows a padded position, the loss and its
    gradients are the same without the mask, and attention runs as plain causal attention (SDPA's `is_causal`,
    petune's bf16 kernel) rather than over an explicit mask, which the CPU kernels compute in full.
    Explicit position ids do not change that, and with them even a mask of all ones goes (packed rows: the
    position ids alone then make attention causal within each example, see `petune.train.data.pack`). Left
    padding, gaps and labels after padding keep the mask.
    """
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return inputs
    packed = inputs.get("position_ids") is not None  # restarting positions work only without a mask
    if mask.shape != labels.shape or (bool(mask.all()) and not packed):
        return inputs
    if not bool(mask.all()):
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        unread = bool((labels[:, 1:][mask[:, :-1] == 0] == IGNORE_INDEX).all())
        if not (right_padded and unread):
            return inputs
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)`, its input gradient computed in the forward.

    With the head frozen, the only gradient needed is d loss / d hidden = (softmax - onehot) @ weight,
    which each chunk can produce while its logits exist; afterwards only that (N, H) gradient is kept.
    One matmul forward and one backward per chunk, as in the plain path, and no recomputation.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        if _slow_16bit_matmul(weight):
            weight = weight.float()  # an fp32 copy for this loss only (SmolLM2: 113 MB)
            bias = None if bias is None else bias.float()
        hidden = hidden.to(weight.dtype)
        rows = min(chunk_size, targets.numel())
        if bias is None and native.applies(hidden, weight):  # bf16 on a CPU: the softmax in one C pass (native.py)
            logits = hidden.new_empty((rows, weight.shape[0]))  # turned into its own gradient in place
            for start in range(0, targets.numel(), chunk_size):
                piece = slice(start, start + chunk_size)
                chunk = logits[: hidden[piece].shape[0]]
                total += native.cross_entropy_(torch.mm(hidden[piece], weight.t(), out=chunk), targets[piece]).sum()
                grad_hidden[piece] = chunk @ weight
            ctx.save_for_backward(grad_hidden)
            return total
        # One fp32 (rows, vocab) buffer for every chunk, and for a 16-bit head one 16-bit buffer for its matmuls'
        # operands: a fresh pair per chunk would leave the allocator holding the freed ones.
        buffer = hidden.new_empty((rows, weight.shape[0]), dtype=torch.float32)
        low = None if weight.dtype == torch.float32 else hidden.new_empty((rows, weight.shape[0]))
        for start in range(0, targets.numel(), chunk_size):
            piece = slice(start, start + chunk_size)
            chunk = hidden[piece]
            logits = buffer[: chunk.shape[0]]  # (n, vocab)
            if low is None:
                torch.mm(chunk, weight.t(), out=logits)
            else:
                logits.copy_(torch.mm(chunk, weight.t(), out=low[: chunk.shape[0]]))
            if bias is not None:
                logits += bias
            picked = torch.arange(chunk.shape[0], device=hidden.device), targets[piece]
            chosen = logits[picked]
            top = logits.amax(dim=-1, keepdim=True)
            sums = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)  # softmax in place: no second (n, vocab)
            total += (sums.log() + top).sum() - chosen.sum()  # cross-entropy: logsumexp - chosen logit
            probabilities = logits.div_(sums)
            probabilities[picked] -= 1.0
            operand = probabilities if low is None else low[: chunk.shape[0]].copy_(probabilities)
            grad_hidden[piece] = operand @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None


def _slow_16bit_matmul(weight: torch.Tensor) -> bool:
    """Whether this 16-bit CPU weight's matmuls are so slow that an fp32 copy of it is the faster loss.

    Without oneDNN's 16-bit kernels (a CPU without AVX-512, such as an AVX2-only AMD EPYC), PyTorch multiplies
    bf16 and fp16 with a reference gemm. Measured on such a CPU, one chunk of 256 positions on SmolLM2's head
    (49,152 x 576): the logits 4.6 s in bf16, 0.7 s in fp32; their gradient times the weight 4.7 s in bf16 (82 s
    in the untransposed layout), 0.6 s in fp32; the fp32 copy of the weight 0.24 s.
    """
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    if weight.dtype == torch.bfloat16:
        return not bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return not bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())

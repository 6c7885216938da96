"""The chunked loss equals the model's own `labels=` loss, in value and in gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from petune import LoraConfig, get_peft_model, loss
from petune.loss import _slow_16bit_matmul, causal_lm_loss


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ).eval()  # no dropout


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0  # a right-padded row
    labels = input_ids.clone()
    labels[:, :4] = -100  # completion-only: prompt tokens masked
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("build", [_llama, _gpt2])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_loss_matches_model_loss_and_gradients(build, chunk_size):
    batch = _batch()
    reference = get_peft_model(build(), LoraConfig(r=4, init_lora_weights=False))
    ours = get_peft_model(build(), LoraConfig(r=4, init_lora_weights=False))

    reference.return_logits = True  # the model's own `labels=` loss over the full logits
    expected = reference(**batch).loss
    expected.backward()
    got = causal_lm_loss(ours, batch, chunk_size=chunk_size)
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6)


def test_num_items_divides_the_sum():
    batch = _batch()
    model = get_peft_model(_llama(), LoraConfig(r=4))
    mean = causal_lm_loss(model, batch)
    count = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(causal_lm_loss(model, batch, num_items=2 * count), mean / 2)


def test_no_labels_gives_zero_loss_with_a_graph():
    batch = _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    model = get_peft_model(_llama(), LoraConfig(r=4))
    loss = causal_lm_loss(model, batch)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable: an all-masked micro-batch must not crash the loop


def test_a_trained_head_takes_the_recomputing_path_with_the_same_result():
    # modules_to_save makes lm_head a trained copy: the loss must still match, and its weights get gradients.
    batch = _batch()
    config = LoraConfig(r=4, init_lora_weights=False, modules_to_save=["lm_head"])
    reference = get_peft_model(_llama(), config)
    ours = get_peft_model(_llama(), config)
    reference.return_logits = True  # the model's own `labels=` loss over the full logits
    expected = reference(**batch).loss
    expected.backward()
    got = causal_lm_loss(ours, batch, chunk_size=5)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    grads = dict(reference.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n, _ in trained)
    for name, param in trained:
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_the_models_own_head_runs_on_one_contiguous_position(build):
    """A strided (batch, 1, hidden) view costs a bf16 head on CPU a copy of its weight per row; none is passed."""
    model = get_peft_model(build(), LoraConfig(r=4))
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        causal_lm_loss(model, _batch()).backward()
    finally:
        handle.remove()
    assert [(tuple(x.shape), x.is_contiguous()) for x in seen] == [((3, 1, 32), True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_head_with_a_bias_matches_the_plain_loss_over_a_partial_last_chunk(dtype):
    batch = _batch()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    chunk_size = 4
    assert labelled % chunk_size, "the last chunk must be a partial one"

    def build() -> torch.nn.Module:
        model = _llama()
        model.lm_head = torch.nn.Linear(32, 97, bias=True)  # a frozen head of its own with a bias, seeded below
        torch.manual_seed(2)
        torch.nn.init.normal_(model.lm_head.bias, std=1.0)
        return get_peft_model(model.to(dtype), LoraConfig(r=4, init_lora_weights=False))

    reference, ours = build(), build()
    reference.return_logits = True  # the model's own `labels=` loss over the full logits
    expected = reference(**batch).loss
    expected.backward()
    got = causal_lm_loss(ours, batch, chunk_size=chunk_size)
    got.backward()

    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got.float(), expected.float(), **tolerance)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad.float(), grads[name].float(), **tolerance)


class _ChunkLogits(TorchDispatchMode):
    """Keeps every (at most `rows`, vocab) tensor an operation returns whose storage could hold a whole chunk's
    logits, so that no two of them can share an address (the model's own head on 3 rows and its weight are not
    such tensors)."""

    def __init__(self, rows: int, vocab: int) -> None:
        super().__init__()
        self.rows, self.vocab, self.kept = rows, vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.dim() == 2
                and t.shape[0] <= self.rows
                and t.shape[1] == self.vocab
                and t.untyped_storage().nbytes() >= self.rows * self.vocab * t.element_size()
            ):
                self.kept.append(t)
        return out


@pytest.mark.parametrize(
    ("dtype", "native", "buffers"), [(torch.float32, "1", 1), (torch.bfloat16, "1", 1), (torch.bfloat16, "0", 2)]
)
def test_every_chunk_reuses_one_logits_buffer(dtype, native, buffers, monkeypatch: pytest.MonkeyPatch):
    """fp32 logits in one buffer, however many chunks there are; a 16-bit head's op-by-op softmax (PETUNE_NATIVE=0)
    in one more, for its matmuls' operands, where petune's C kernel turns the 16-bit logits into their gradient."""
    monkeypatch.setenv("PETUNE_NATIVE", native)
    batch = _batch()
    assert int((batch["labels"][:, 1:] != -100).sum()) > 4 * 4  # five chunks of 4, the last one partial
    model = get_peft_model(_llama().to(dtype), LoraConfig(r=4))
    if _slow_16bit_matmul(model.get_output_embeddings().weight):
        buffers = 1  # this CPU computes a 16-bit head's loss in fp32 (no oneDNN 16-bit kernels)
    mode = _ChunkLogits(rows=4, vocab=97)
    with mode:
        causal_lm_loss(model, batch, chunk_size=4)
    assert len({t.untyped_storage().data_ptr() for t in mode.kept}) == buffers


def test_a_16bit_head_on_a_cpu_without_fast_16bit_matmuls_computes_in_fp32(monkeypatch: pytest.MonkeyPatch):
    """The fp32 copy gives the loss and gradients of the 16-bit path (to bf16 rounding), wherever it is taken."""
    batch = _batch()
    results = []
    for slow in (False, True):
        monkeypatch.setattr(loss, "_slow_16bit_matmul", lambda weight, slow=slow: slow)
        model = get_peft_model(_llama().to(torch.bfloat16), LoraConfig(r=4, init_lora_weights=False))
        value = causal_lm_loss(model, batch)
        value.backward()
        results.append((value, [p.grad for p in model.parameters() if p.requires_grad]))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(slow.float(), fast.float(), rtol=2e-2, atol=2e-2)
    for got, expected in zip(slow_grads, fast_grads, strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def _seen_masks(model, batch):
    """The attention masks the model's forward receives during `causal_lm_loss`, and the loss."""
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        loss = causal_lm_loss(model, batch)
    finally:
        hook.remove()
    return seen, loss


@pytest.mark.parametrize("case", ["right", "left", "label after padding", "no padding"])
def test_right_padding_runs_without_a_mask_only_where_that_changes_no_loss(case):
    """Right padding that no label reads is dropped (plain causal attention); anything else keeps the mask.
    The loss is the model's own `labels=` loss with the mask either way."""
    batch = _batch()
    mask, labels = batch["attention_mask"], batch["labels"]
    if case == "left":
        mask[0] = mask[0].flip(0)
        labels[0] = torch.where(mask[0] == 1, batch["input_ids"][0], -100)
    elif case == "label after padding":
        labels[0, -1] = batch["input_ids"][0, -1]
    elif case == "no padding":
        mask.fill_(1)
    model = _llama()
    expected = model(**batch).loss
    seen, loss = _seen_masks(model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert len(seen) == 1
    if case == "right":
        assert seen[0] is None
    else:
        assert seen[0] is batch["attention_mask"]

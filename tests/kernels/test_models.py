"""petune's kernels inside tiny Llama and Qwen2 models: same outputs and gradients as stock transformers,
fewer bytes kept by autograd, gradient checkpointing, and a clean way back to the stock modules."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

import petune
from petune import kernels
from petune.kernels import RMSNormFunction, SwiGLUFunction, attention
from tests.conftest import build_batch, build_tiny_model

TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}
ADAPTED_NORMS = {"q,v": 1, "all-linear": 2}  # norms whose output an adapter keeps as its input too


def wrapped(arch: str, targets: str, dtype: torch.dtype = torch.float32) -> petune.PeftModel:
    model = build_tiny_model(arch).to(dtype)
    torch.manual_seed(0)  # init_lora_weights=False: random A and B, so the adapters change the output
    config = petune.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=TARGETS[targets], init_lora_weights=False)
    return petune.get_peft_model(model, config)


def forward_backward(model: petune.PeftModel) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, gradient of the input embeddings, adapter gradients) of one fixed batch."""
    batch = build_batch()
    dtype = model.get_input_embeddings().weight.dtype
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    model.zero_grad(set_to_none=True)
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.manual_seed(1)
    (logits.float() * torch.randn(logits.shape)).sum().backward()
    assert embeds.grad is not None and embeds.grad.dtype == dtype
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), embeds.grad, grads


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_equal_stock(arch: str, targets: str, dtype: torch.dtype) -> None:
    model = wrapped(arch, targets, dtype)
    assert kernels.is_enabled(model)  # on by default
    logits, input_grad, grads = forward_backward(model)
    assert kernels.disable(model) == 2 * 3  # per layer two norms and the MLP (not the final norm)
    stock_logits, stock_input_grad, stock_grads = forward_backward(model)
    assert torch.equal(logits, stock_logits)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    scale = stock_input_grad.float().abs().max()
    torch.testing.assert_close(input_grad.float() / scale, stock_input_grad.float() / scale, **tolerance)
    assert grads.keys() == stock_grads.keys() and grads
    for name, grad in stock_grads.items():
        scale = grad.abs().max()
        torch.testing.assert_close(grads[name] / scale, grad / scale, **tolerance)


def kept_bytes(model: petune.PeftModel) -> int:
    """Bytes of the distinct tensors autograd keeps for one forward, less the model's parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = build_batch(pad=False)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs_embeds=embeds)
    return sum(sizes.values())


@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_keep_fewer_bytes(targets: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per layer and token: silu(gate) (a i bytes) and the norms' savings. fp32: a norm keeps its output, which
    the adapter after it keeps anyway (4 h each); bf16: each norm keeps its bf16 input, not an fp32 copy (2 h).
    The bf16 attention kernel, which keeps more, is off here (its bytes: test_attention.py)."""
    monkeypatch.setattr(attention, "MAX_LENGTH", 1)
    model = wrapped("llama", targets, dtype)
    with_kernels = kept_bytes(model)
    kernels.disable(model)
    stock = kept_bytes(model)
    config = model.config
    a, h, i = 4 if dtype == torch.float32 else 2, config.hidden_size, config.intermediate_size
    norms = 4 * h * ADAPTED_NORMS[targets] if dtype == torch.float32 else 2 * 2 * h
    tokens = build_batch(pad=False)["input_ids"].numel()
    assert stock - with_kernels == tokens * config.num_hidden_layers * (a * i + norms)


def count_backwards(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the kernels whose backward runs from now on (in this test)."""
    calls: list[str] = []
    for function in (RMSNormFunction, SwiGLUFunction):

        def counted(
            ctx: Any, grad: torch.Tensor, backward: Any = function.backward, name: str = function.__name__
        ) -> Any:
            calls.append(name)
            return backward(ctx, grad)

        monkeypatch.setattr(function, "backward", staticmethod(counted))
    return calls


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_run_stock_with_the_same_gradients(
    reentrant: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under transformers' gradient checkpointing the kernels step aside: they would save nothing there."""
    reference = wrapped("llama", "all-linear")
    reference.train()
    _, _, expected = forward_backward(reference)
    model = wrapped("llama", "all-linear")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    calls = count_backwards(monkeypatch)
    _, _, grads = forward_backward(model)
    assert calls == []
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():  # stock layers against kernels: equal to fp32 rounding
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_kernels_are_safe_to_recompute(reentrant: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own checkpoint around a decoder layer: the kernels run again in backward, same gradients."""
    model = wrapped("llama", "all-linear")
    model.train()
    decoder = model.get_base_model().model
    layer = decoder.layers[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    torch.manual_seed(2)
    hidden = torch.randn(2, 8, model.config.hidden_size)
    positions = torch.arange(8)[None]
    rotary = decoder.rotary_emb(hidden, positions)

    def gradients(checkpointed: bool) -> list[torch.Tensor]:
        inputs = hidden.clone().requires_grad_()
        if checkpointed:
            out = checkpoint(lambda x: layer(x, position_embeddings=rotary), inputs, use_reentrant=reentrant)
        else:
            out = layer(inputs, position_embeddings=rotary)
        out = out[0] if isinstance(out, tuple) else out
        layer.zero_grad(set_to_none=True)
        (out * out).sum().backward()  # reentrant checkpointing refuses autograd.grad
        return [tensor.grad.clone() for tensor in (inputs, *params) if tensor.grad is not None]

    expected = gradients(False)
    assert len(expected) == 1 + len(params)
    calls = count_backwards(monkeypatch)
    for grad, reference in zip(gradients(True), expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
    assert sorted(calls) == ["RMSNormFunction", "RMSNormFunction", "SwiGLUFunction"]


def is_stock(model: torch.nn.Module) -> bool:
    return not any("forward" in vars(module) for module in model.modules())


def test_unload_and_merge_and_unload_return_stock_modules() -> None:
    stock_logits = forward_backward(wrapped("llama", "q,v"))[0]
    for unload in ("unload", "merge_and_unload"):
        model = wrapped("llama", "q,v")
        base = getattr(model, unload)()
        assert is_stock(base) and not kernels.is_enabled(base)
        norm = base.model.layers[0].input_layernorm
        assert isinstance(norm, LlamaRMSNorm) and norm.forward.__func__ is LlamaRMSNorm.forward
        if unload == "merge_and_unload":  # the merged model computes what the adapted one did
            with torch.no_grad():
                torch.testing.assert_close(base(**build_batch()).logits, stock_logits, rtol=1e-4, atol=1e-5)


def test_get_base_model_computes_what_stock_transformers_does() -> None:
    """The live base model (adapters and kernels in place, shared with the PeftModel) gives stock outputs."""
    model = wrapped("llama", "q,v")
    base = model.get_base_model()
    assert kernels.is_enabled(base)
    logits = base(**build_batch()).logits
    kernels.disable(base)
    assert torch.equal(logits, base(**build_batch()).logits)


def test_kernels_stay_across_train_and_eval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers re-kernelises a `from_pretrained` model (hub kernels are on by default once the `kernels`
    package is installed) on every train/eval switch, removing instance forwards of the modules its hub kernels
    know: RMSNorm's. `model.train()`, as every training loop calls it, ran stock RMSNorm before this was kept."""
    build_tiny_model("llama").save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    config = petune.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    model = petune.get_peft_model(base, config)
    patched = kernels.patched_forwards(model)
    assert len(patched) == 6
    for mode in (True, False, True):
        model.train(mode)
        assert kernels.patched_forwards(model) == patched
    calls = count_backwards(monkeypatch)
    batch = build_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    # both layers' MLPs and their norms but the first (its input, the frozen embeddings, needs no gradient)
    assert sorted(calls) == ["RMSNormFunction"] * 3 + ["SwiGLUFunction"] * 2
    kernels.disable(model)
    model.train()  # a user's disable stays
    assert is_stock(model.get_base_model())


def test_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETUNE_KERNELS", "0")
    assert is_stock(wrapped("llama", "q,v").get_base_model())
    monkeypatch.delenv("PETUNE_KERNELS")
    model = wrapped("llama", "q,v")
    assert kernels.disable(model) == 6 and is_stock(model)
    assert kernels.enable(model) == 6 and kernels.enable(model) == 0  # idempotent


def test_only_silu_mlps_and_known_classes_are_patched() -> None:
    gelu = build_tiny_model("llama", hidden_act="gelu")
    assert kernels.enable(gelu) == 2 * 2  # the layers' norms only
    assert all("forward" not in vars(module) for module in gelu.modules() if isinstance(module, LlamaMLP))
    assert kernels.enable(build_tiny_model("gpt2")) == 0


def test_trained_norm_falls_back_to_stock_and_gets_its_gradient() -> None:
    """modules_to_save copies a patched norm: the copy's forward follows the copy, and since its weight
    trains it runs the stock forward (the kernel computes no weight gradient)."""
    model = build_tiny_model("llama")
    config = petune.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["post_attention_layernorm"]
    )
    peft_model = petune.get_peft_model(model, config)
    trained = peft_model.get_base_model().model.layers[1].post_attention_layernorm.adapters["default"]
    forward: Any = vars(trained)["forward"]
    assert forward.module is trained
    _, _, grads = forward_backward(peft_model)
    assert any(name.endswith("layers.1.post_attention_layernorm.adapters.default.weight") for name in grads)


def test_deepcopy_rebinds_the_patched_forward() -> None:
    model = wrapped("llama", "q,v")
    twin = copy.deepcopy(model)
    norm = twin.get_base_model().model.layers[0].input_layernorm
    assert vars(norm)["forward"].module is norm
    assert torch.equal(forward_backward(twin)[0], forward_backward(model)[0])
    layer = twin.get_base_model().model.layers[0]
    assert vars(norm)["forward"].layer is layer  # the whole model copied: the copied layer


def test_copying_one_patched_module_copies_no_layer() -> None:
    """LN tuning and modules_to_save copy single norms: the copy's forward keeps the original layer (it runs
    inside it) instead of a private copy of the whole decoder layer (LN tuning on SmolLM2 held 60 of them,
    +1.1 GB)."""
    model = build_tiny_model("llama")
    kernels.enable(model)
    layer = model.model.layers[0]
    twin = copy.deepcopy(layer.input_layernorm)
    forward: Any = vars(twin)["forward"]
    assert forward.module is twin and forward.layer is layer
    wrapped_model = petune.get_peft_model(model, petune.LNTuningConfig(task_type="CAUSAL_LM"))
    tuned = wrapped_model.get_base_model().model.layers[0].input_layernorm.adapters["default"].ln_tuning_layers
    assert vars(tuned)["forward"].layer is layer

"""`petune plan`'s arithmetic against hand-computed cases, transformers' own counts and autograd's saved tensors."""

from __future__ import annotations

import json
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import petune
from petune.plan import ARCHITECTURES, Architecture, Setup, plan, resolve_architecture
from petune.plan.architectures import from_config_json
from petune.plan.counts import adapter_params, total_params
from petune.plan.gpus import GIB, Device
from petune.plan.memory import largest_fitting, layer_activation_bytes
from petune.plan.setup import LAYER_METHODS, LINEAR_NAMES
from petune.train import UserError
from petune.train.config import build_config
from petune.train.methods import peft_config
from tests.conftest import build_tiny_model

# Published totals: exact where known (hub safetensors metadata, GGUF metadata), else the papers' or model
# cards' rounded figures.
PUBLISHED: dict[str, int | str] = {
    "llama-7b": "6.7B",
    "llama-13b": "13.0B",
    "llama-30b": "32.5B",
    "llama-65b": "65.2B",
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": "0.49B",
    "qwen2.5-1.5b": "1.54B",
    "qwen2.5-3b": "3.09B",
    "qwen2.5-7b": "7.61B",
    "qwen2.5-14b": 14_770_033_664,  # general.parameter_count of its GGUF files
    "qwen2.5-32b": 32_763_876_352,  # the config's shapes; the model card's "32.5B" is below them
    "qwen2.5-72b": "72.7B",
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


def write_config(config: Any, folder: Path) -> Path:
    path = folder / "config.json"
    config.to_json_file(path)
    return path


def hf_config(arch: Architecture, **overrides: Any) -> Any:
    """The transformers config of a table entry (Qwen2 for the biased ones, Llama otherwise)."""
    kind = Qwen2Config if arch.attention_bias else LlamaConfig
    fields = {
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "intermediate_size": arch.intermediate_size,
        "vocab_size": arch.vocab_size,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "max_position_embeddings": arch.max_position_embeddings,
    }
    return kind(**{**fields, **overrides})


def numel(config: Any) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# --- parameter counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_table_gives_the_published_parameter_count(name: str) -> None:
    published = PUBLISHED[name]
    count = total_params(ARCHITECTURES[name])
    if isinstance(published, int):
        assert count == published
    else:  # "6.7B": papers and cards round or truncate, so within one unit of the last digit
        digits = len(published.rstrip("B").partition(".")[2])
        assert abs(count / 1e9 - float(published.rstrip("B"))) < 10**-digits


@pytest.mark.parametrize("name", ["llama-2-70b", "llama-3-8b", "qwen2.5-0.5b", "qwen2.5-7b", "smollm2-135m"])
def test_count_equals_what_transformers_builds(name: str) -> None:
    arch = ARCHITECTURES[name]
    two_layers = Architecture(**{**arch.__dict__, "num_layers": 2})
    assert total_params(two_layers) == numel(hf_config(arch, num_hidden_layers=2))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_config_json_count_equals_the_tiny_model(arch: str, tmp_path: Path) -> None:
    model = build_tiny_model(arch)
    shape = from_config_json(write_config(model.config, tmp_path))
    assert total_params(shape) == sum(p.numel() for p in model.parameters())
    assert shape.attention_bias == (arch == "qwen2")


def test_smollm2_shape_is_the_embedded_models() -> None:
    assert total_params(resolve_architecture("smollm2-135m")) == 134_515_008
    assert numel(hf_config(resolve_architecture("embedded"))) == 134_515_008


@pytest.mark.real_model
def test_gguf_and_config_json_of_the_embedded_model() -> None:
    from petune.embedded import embedded_gguf_path, embedded_model_dir

    for source in (embedded_gguf_path(), embedded_model_dir()):
        arch = resolve_architecture(str(source))
        assert total_params(arch) == 134_515_008
        assert (arch.num_kv_heads, arch.tie_word_embeddings, arch.max_position_embeddings) == (3, True, 8192)


ADAPTERS = {
    "lora": (Setup(method="lora", lora_r=4), petune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "lora all-linear": (
        Setup(method="lora", lora_r=4, lora_targets=LINEAR_NAMES),
        petune.LoraConfig(r=4, target_modules="all-linear"),
    ),
    "dora": (
        Setup(method="dora", lora_r=4),
        petune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    ),
    "prompt": (Setup(method="prompt", virtual_tokens=5), petune.PromptTuningConfig(num_virtual_tokens=5)),
    "ptuning": (
        Setup(method="ptuning", virtual_tokens=5, encoder_hidden_size=16),
        petune.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=16),
    ),
    "prefix": (Setup(method="prefix", virtual_tokens=5), petune.PrefixTuningConfig(num_virtual_tokens=5)),
    "prefix projection": (
        Setup(method="prefix", virtual_tokens=5, encoder_hidden_size=16, prefix_projection=True),
        petune.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16),
    ),
}


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_layer_method_count_equals_what_petune_train_trains(method: str, tmp_path: Path) -> None:
    """With `petune train`'s defaults for the method (and a non-default option set where it changes the count)."""
    model = build_tiny_model("llama")
    shape = from_config_json(write_config(model.config, tmp_path))
    # FourierFT's default 1000 coefficients are more than the tiny model's v_proj has weights
    defaults: list[dict[str, object]] = [] if method == "fourierft" else [{}]
    for options in [*defaults, LAYER_METHOD_OPTIONS[method]]:
        cfg = build_config({"method": method}, {f"{method}.{k}": v for k, v in options.items()})
        config = peft_config(cfg, "unused")
        trainable, _ = petune.get_peft_model(build_tiny_model("llama"), config).get_nb_trainable_parameters()
        assert adapter_params(shape, Setup(method=method, options=getattr(cfg, method))) == trainable, options


LAYER_METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "ia3": {"target_modules": "all-linear", "feedforward_modules": "up_proj,gate_proj"},
    "ln_tuning": {"target_modules": "input_layernorm"},
    "loha": {"r": 3, "target_modules": "q_proj,down_proj"},
    "lokr": {"r": 2, "decompose_both": True, "decompose_factor": 4, "target_modules": "all-linear"},
    "vera": {"r": 16},
    "hra": {"r": 4, "target_modules": "o_proj,up_proj"},
    "fourierft": {"n_frequency": 100},
    "oft": {"oft_block_size": 12, "block_share": True},
    "boft": {"boft_block_size": 4, "boft_n_butterfly_factor": 3, "target_modules": "all-linear"},
    "adalora": {"init_r": 5, "target_r": 3, "target_modules": "k_proj,gate_proj"},
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_count_equals_petunes(name: str, tmp_path: Path) -> None:
    setup, config = ADAPTERS[name]
    config.task_type = "CAUSAL_LM"
    model = build_tiny_model("llama")
    shape = from_config_json(write_config(model.config, tmp_path))
    trainable, _ = petune.get_peft_model(model, config).get_nb_trainable_parameters()
    assert adapter_params(shape, setup) == trainable


# --- activations: the formula against what autograd keeps -------------------------------------------------


def saved_bytes(layer: torch.nn.Module, model: torch.nn.Module, tokens: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors one decoder layer's autograd graph still holds after forward, less the
    parameters and the rotary cos/sin."""
    batch, seq = tokens
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: list[tuple[weakref.ref[Any], int, int]] = []

    class Box:  # a saved tensor's holder; alive exactly as long as the graph keeps the tensor
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    def pack(tensor: torch.Tensor) -> Box:
        box = Box(tensor.detach())  # detached: a node saving its own output must not keep itself alive
        storage = tensor.untyped_storage()
        held.append((weakref.ref(box), storage.data_ptr(), storage.nbytes()))
        return box

    hidden = torch.randn(batch, seq, layer.self_attn.config.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq)[None]
    rotary = model.get_decoder().rotary_emb(hidden, positions)
    weights |= {t.untyped_storage().data_ptr() for t in rotary}  # cos/sin: made once, shared by all layers
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        out = layer(hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    assert out is not None  # keeps the graph alive while we look
    alive = {ptr: size for ref, ptr, size in held if ref() is not None and ptr not in weights}
    return sum(alive.values())


CENSUS = {  # method -> (Setup fields, petune config or None)
    "full": ({}, None),
    "lora": ({}, petune.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])),
    "lora all-linear": ({"lora_targets": LINEAR_NAMES}, petune.LoraConfig(r=8, target_modules="all-linear")),
    "dora": ({}, petune.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "prompt": ({"virtual_tokens": 16}, "frozen"),
}


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "stock"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("name", list(CENSUS))
def test_layer_activations_equal_what_autograd_saves(
    name: str, precision: str, kernels: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16-true: a bf16 model; bf16-mixed: the same under autocast, as `petune train --precision bf16` runs.
    kernels: petune's RMSNorm and SwiGLU (every PeftModel's default); stock: `PETUNE_KERNELS=0`."""
    if name == "dora" and precision != "fp32":
        pytest.skip("DoRA is checked in fp32")
    if name == "full" and not kernels:
        pytest.skip("full fine-tuning never runs the kernels: the other case checks it")
    monkeypatch.setenv("PETUNE_KERNELS", "1" if kernels else "0")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    config = LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2
    )
    config.vocab_size = 100
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fields, adapter = CENSUS[name]
    method = "lora" if name == "lora all-linear" else name
    if adapter == "frozen":  # prompt methods: nothing in the layer trains, gradients still flow through it
        model.requires_grad_(False)
        if kernels:  # as their PeftModel does
            petune.kernels.enable(model)
    elif adapter is not None:
        adapter.task_type = "CAUSAL_LM"
        model = petune.get_peft_model(model, adapter).base_model.model
    batch, seq = 2, 96
    virtual = fields.get("virtual_tokens", 0)
    setup = Setup(method=method, precision=precision, batch_size=batch, seq_len=seq - virtual, **fields)
    arch = from_config_json(write_config(config, tmp_path))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        measured = saved_bytes(model.get_decoder().layers[0], model, (batch, seq), dtype)
    predicted = layer_activation_bytes(arch, setup, "cpu")
    if name == "dora":  # less a few vectors of out_features (DoRA's norm scale)
        assert predicted == pytest.approx(measured, rel=0.002)
    else:
        assert predicted == measured


# --- bytes by component, by hand ---------------------------------------------------------------------------


def test_components_by_hand() -> None:
    """A 2-layer model, LoRA r=4 on q and v, fp32 on a 1 GiB CUDA device, batch 2 x 8, no checkpointing, with
    petune's kernels (PeftModel's default)."""
    arch = Architecture("hand", 64, 2, 4, 2, 128, 1000, False, 256)  # h 64, 4 heads of 16, kv width 32
    setup = Setup(method="lora", precision="fp32", batch_size=2, seq_len=8, lora_r=4)
    device = Device("test", "cuda", GIB)
    result = plan(arch, setup, device)

    params = 2 * 1000 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    lora = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # q: 64 -> 64, v: 64 -> 32
    tokens = 16
    per_token_layer = (
        2 * (4 * 64 + 4)  # two RMSNorm outputs and their 1/rms; the first is also the q/k/v input LoRA's A keeps
        + 4 * (64 + 64)  # q and the attention output
        + 4 * 4  # softmax log-sum-exp per head
        + 2 * 4 * 128  # gate and up outputs (the SwiGLU kernel recomputes SiLU)
        + 2 * 4 * 4  # A's outputs (r = 4) for q and v
        + 2 * 4 * 32  # k and v
    )
    activations = 2 * tokens * per_token_layer + tokens * (4 * 64 + 4)  # + the final norm
    kept = 2 * 7 * 4 * 64  # hidden states of the 14 labelled positions
    loss_scratch = 14 * 1000 * 4  # one chunk of 14 positions x vocab, one fp32 buffer (the head is frozen)
    assert result.peak_phase == "backward start"
    assert result.components == {
        "frozen_weights": 4 * params,
        "trainable_weights": 4 * lora,
        "gradients": 0,
        "optimizer_state": 8 * lora,
        "activations": activations,
        "logits_loss": kept + loss_scratch,
        "framework_overhead": GIB,
    }
    assert result.total_bytes == sum(result.components.values())
    assert not result.fits  # the 1 GiB overhead alone fills the device


def test_gradient_checkpointing_keeps_layer_inputs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETUNE_KERNELS", "0")  # the recomputed layer runs stock either way: compare like with like
    arch = ARCHITECTURES["llama-2-7b"]
    plain = plan(arch, Setup(method="lora", batch_size=4, seq_len=1024), Device("d", "cuda", 80 * GIB))
    ckpt = plan(arch, Setup(method="lora", batch_size=4, seq_len=1024, gradient_checkpointing=True), plain.device)
    # 32 layer inputs of 4 x 1024 x 4096 bf16 values, plus the final norm's input and one recomputed layer
    layer_inputs = 32 * 4 * 1024 * 4096 * 2
    assert layer_inputs < ckpt.components["activations"] < layer_inputs + plain.components["activations"] / 16
    assert plain.components["activations"] > 10 * layer_inputs / 2


def test_checkpointed_layers_are_counted_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under gradient checkpointing petune's kernels step aside inside the layers (petune.kernels.base)."""
    arch, setup = ARCHITECTURES["smollm2-135m"], Setup(method="lora", precision="fp32", batch_size=4, seq_len=256)
    kernels, checkpointed = layer_activation_bytes(arch, setup), replace(setup, gradient_checkpointing=True)
    monkeypatch.setenv("PETUNE_KERNELS", "0")
    stock = layer_activation_bytes(arch, setup)
    assert layer_activation_bytes(arch, checkpointed) == stock
    assert stock - kernels == 4 * 256 * 4 * (576 + 1536)  # the first norm's output and silu(gate), fp32


def test_largest_batch_and_sequence_fit_and_one_more_does_not() -> None:
    arch, device = ARCHITECTURES["llama-2-7b"], Device("24", "cuda", 24 * GIB)
    setup = Setup(method="lora", seq_len=1024)
    batch = largest_fitting(arch, setup, device, "batch_size", 4096)
    assert batch >= 1
    assert plan(arch, Setup(method="lora", seq_len=1024, batch_size=batch), device).fits
    assert not plan(arch, Setup(method="lora", seq_len=1024, batch_size=batch + 1), device).fits
    assert largest_fitting(arch, Setup(method="full"), device, "batch_size", 4096) == 0


# --- bad input ----------------------------------------------------------------------------------------------


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(UserError) as error:
        resolve_architecture("llama-9b")
    assert "llama-9b" in str(error.value)
    assert all(name in str(error.value) for name in ARCHITECTURES)


def test_config_without_the_needed_fields_names_them(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "vocab_size": 100, "num_attention_heads": 4}))
    with pytest.raises(UserError) as error:
        resolve_architecture(str(path))
    message = str(error.value)
    assert "hidden_size" in message and "num_hidden_layers" in message and "intermediate_size" in message
    assert "vocab_size" not in message and "num_attention_heads" not in message


def test_bad_setup_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--method"):
        Setup(method="adapterdrop")
    with pytest.raises(UserError, match="--lora-targets"):
        Setup(lora_targets=("qkv",))
    with pytest.raises(UserError, match="--batch-size"):
        Setup(batch_size=0)


def test_the_plan_assumes_the_loss_chunk_petune_computes() -> None:
    from petune.loss import CHUNK_SIZE

    assert Setup().loss_chunk == CHUNK_SIZE

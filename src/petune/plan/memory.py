"""The memory of one training step, by component, and the peak it reaches.

Two moments bound a step's memory. At the start of the backward pass every activation the forward pass
saved is alive and few gradients exist; by the optimizer step the activations are freed and every gradient
exists. Between the two, each layer's backward frees its activations as it makes its gradients, so the
peak is the larger of the two moments (petune's measured peaks agree: tests/plan/test_calibration.py):

    backward start  weights + optimizer state + saved activations + loss scratch (or one layer's backward)
    optimizer step  weights + optimizer state + all gradients + the step's scratch

Under `--strategy` with N devices each phase is the memory of one device (petune.plan.sharding: ZeRO's and
FSDP's partitioning). `Plan.components` is the memory at the peak moment, so its values add up to
`total_bytes`; `Plan.sizes` is the most each component reaches during the step.

Activations are counted from what autograd really keeps in a transformers Llama layer (SDPA attention,
HF's RMSNorm, which upcasts to fp32, or petune's kernels, which every PeftModel runs), not from a rule of
thumb; tests/plan/test_memory.py compares the count with the tensors a real layer saves. For comparison,
Korthikanti et al. 2022 ("Reducing Activation Recomputation", section 4.1) give s b h (34 + 5 a s / h) bytes per
GPT layer in fp16: their 5 a s / h term is the attention matrix, which flash/SDPA kernels never store, and their
dropout masks do not exist in Llama.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from petune.kernels import attention, enabled_by_default
from petune.plan.architectures import Architecture
from petune.plan.counts import adapter_params, largest_trainable_tensor, linear_shapes, total_params
from petune.plan.gpus import Device
from petune.plan.overhead import engine_overhead_bytes
from petune.plan.setup import OPTIMIZER_STATES, Setup
from petune.plan.sharding import per_device

COMPONENTS = (
    "frozen_weights",
    "trainable_weights",
    "gradients",
    "optimizer_state",
    "activations",
    "logits_loss",
    "framework_overhead",
)
# QLoRA's NF4 with double quantisation (Dettmers et al. 2023, section 3): 4 bits per weight plus 8-bit
# constants per block of 64 and fp32 constants per 256 blocks: 4 + 8/64 + 32/(64 x 256) = 4.127 bits.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
FP32 = 4
# per logit of one loss chunk: a frozen head's fp32 logits, turned into their gradient in place (petune.loss);
# a trained head's (full fine-tuning) logits, fp32 log-softmax, its gradient and the logits' gradient
FROZEN_HEAD_LOSS_SCRATCH_BYTES = FP32
LOSS_SCRATCH_BYTES = 16


@dataclass(frozen=True)
class Plan:
    """The predicted memory of one step of `setup` on `arch` and `device` (bytes)."""

    architecture: Architecture
    setup: Setup
    device: Device
    components: dict[str, int]
    sizes: dict[str, int]
    peak_phase: str
    trainable_params: int
    total_params: int

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device.memory_bytes


def activation_bytes(precision: str) -> int:
    """Bytes per element of activations, gradients and working weights (16-bit unless fp32)."""
    return FP32 if precision == "fp32" else 2


def weight_bytes(arch: Architecture, setup: Setup) -> tuple[int, int]:
    """(frozen, trainable) weight bytes. QLoRA stores the layers' linear weights in NF4."""
    trainable = adapter_params(arch, setup)
    frozen = total_params(arch) - trainable if setup.method == "full" else total_params(arch)
    width = activation_bytes(setup.precision)
    if setup.method == "qlora":
        linear = arch.num_layers * sum(i * o for i, o in linear_shapes(arch).values())
        frozen_bytes = int(linear * NF4_BYTES) + (frozen - linear) * width  # embeddings, head, norms stay 16-bit
    else:
        frozen_bytes = frozen * width
    return frozen_bytes, trainable * width


def optimizer_state_bytes(trainable: int, setup: Setup) -> int:
    """AdamW's two moments, plus the fp32 master weights of mixed precision (ZeRO's K = 12 bytes)."""
    master = FP32 if setup.precision == "bf16-mixed" else 0
    return trainable * (OPTIMIZER_STATES[setup.optimizer_state] + master)


def optimizer_scratch_bytes(arch: Architecture, setup: Setup, device: Device) -> int:
    """Temporaries of the optimizer step. On CPU, three fp32 copies of the largest trainable tensor: what
    torch's per-tensor AdamW allocates (`sqrt(v)`, its quotient, the previous tensor's denominator), and
    measured the same for the fused kernel petune uses (`petune.optim`; SmolLM2 full fine-tuning, 2 x 64:
    peak 2670 MB fused, 2669 MB per-tensor). On a GPU the plan assumes the fused kernel updates in place."""
    return 3 * FP32 * largest_trainable_tensor(arch, setup) if device.kind == "cpu" else 0


def uses_kernels(setup: Setup) -> bool:
    """Whether the decoder layers run petune's RMSNorm and SwiGLU kernels (`petune.kernels`): in every PeftModel
    unless `PETUNE_KERNELS=0` (full fine-tuning trains the plain transformers model), and not under gradient
    checkpointing, where they step aside. The final norm always runs transformers' own."""
    return setup.method != "full" and not setup.gradient_checkpointing and enabled_by_default()


def blocked_attention(setup: Setup, device_kind: str) -> bool:
    """Whether the layers' attention runs petune's blocked kernel (`petune.kernels.attention`), which keeps the
    attention probabilities: in a PeftModel, in bf16 on a CPU, up to its maximum length (checkpointing too).
    fp16, which the plan sizes as bf16, runs SDPA: for it on a CPU the plan counts the probabilities too."""
    return (
        device_kind == "cpu"
        and setup.precision != "fp32"
        and setup.method != "full"
        and enabled_by_default()
        and attention_length(setup) <= attention.MAX_LENGTH
    )


def attention_length(setup: Setup) -> int:
    """Positions in each row's attention: the sequence and the virtual tokens (in the input or the cache)."""
    return setup.seq_len + setup.virtual_in_input + setup.virtual_in_cache


def norm_bytes(arch: Architecture, setup: Setup, kernel: bool) -> int:
    """Bytes per token one RMSNorm keeps: transformers' keeps its input upcast to fp32 (4h) and 1/rms (4), and
    under full fine-tuning the normalised input for the weight's gradient (a h); petune's kernel keeps the input
    in its own dtype (in fp32 the output instead, the same size) and 1/rms."""
    a, h = activation_bytes(setup.precision), arch.hidden_size
    if kernel:
        return a * h + FP32
    return FP32 * h + FP32 + (a * h if setup.method == "full" else 0)


def layer_activation_bytes(arch: Architecture, setup: Setup, device_kind: str = "cuda") -> int:
    """Bytes one decoder layer keeps for backward, for a batch of `batch_size x seq_len` tokens.

    Per token (a = 2 or 4 bytes; h hidden, q and kv the projection widths, i intermediate, r LoRA rank):
      RMSNorm x2     `norm_bytes`
      linear inputs  a h for q/k/v and for gate/up, a i for down, when one of them trains or carries an
                     adapter (o_proj's input is the attention output, kept anyway); with petune's kernels in
                     fp32 the norm before q/k/v and gate/up keeps its output, which is that input
      attention      q, k, v and the output (a (2q + 2kv)) and the softmax log-sum-exp (4 per head);
                     never the s x s matrix (SDPA / flash attention). In bf16 on a CPU petune's blocked kernel
                     keeps the probabilities instead of the output and log-sum-exp
                     (`petune.kernels.attention.saved_bytes`); the output only when o_proj trains
      gated MLP      gate output, SiLU output, up output (3 a i); petune's SwiGLU kernel keeps gate and up (2 a i)
      adapters       LoRA: A's output (a r) per adapted layer; DoRA also the base and low-rank outputs (2 a out).
                     petune's adapters are fp32; LoRA keeps the 16-bit input itself for A's gradient
                     (`petune.methods.lora.project_down`), DoRA an fp32 copy per adapted layer
    """
    a, h, i = activation_bytes(setup.precision), arch.hidden_size, arch.intermediate_size
    kernels = uses_kernels(setup)
    batch = setup.batch_size
    tokens = batch * (setup.seq_len + setup.virtual_in_input)
    kv_tokens = tokens + batch * setup.virtual_in_cache
    shapes = linear_shapes(arch)
    per_token = 2 * norm_bytes(arch, setup, kernels)
    per_token += (2 if kernels else 3) * a * i
    trains = set(shapes) if setup.method == "full" else set(setup.adapted)
    if setup.method != "dora" or setup.precision == "fp32":  # layers sharing an input keep one copy of it
        if not (kernels and setup.precision == "fp32"):  # there the norm's kept output is that input
            per_token += a * h * bool(trains & {"q_proj", "k_proj", "v_proj"})
            per_token += a * h * bool(trains & {"gate_proj", "up_proj"})
        per_token += a * i * ("down_proj" in trains)
    else:  # DoRA casts each adapted layer's input to fp32: a copy per layer, which autocast (bf16-mixed) turns
        # back into bf16 for the matmul
        per_token += sum((2 if setup.precision == "bf16-mixed" else FP32) * shapes[t][0] for t in setup.adapted)
    # A's output, B's input: fp32 but for autocast's bf16
    adapter = a if setup.precision == "fp32" else 2 if setup.precision == "bf16-mixed" else FP32
    per_token += sum(adapter * setup.lora_r for _ in setup.adapted)
    if setup.method == "dora":
        per_token += sum(2 * adapter * shapes[t][1] for t in setup.adapted)
    # autocast keeps a bf16 copy of each fp32 adapter weight autograd sees it multiply: B (r out), and for DoRA A
    casts = 0
    if setup.precision == "bf16-mixed":
        casts = sum(2 * setup.lora_r * (shapes[t][1] + shapes[t][0] * (setup.method == "dora")) for t in setup.adapted)
    if blocked_attention(setup, device_kind):
        heads, length = (arch.num_heads, arch.num_kv_heads), attention_length(setup)
        kept = attention.saved_bytes(batch, *heads, length, arch.head_dim)
        kept += tokens * a * arch.q_dim * ("o_proj" in trains)  # the output, kept by o_proj as its input
    else:
        kept = tokens * (2 * a * arch.q_dim + FP32 * arch.num_heads) + kv_tokens * 2 * a * arch.kv_dim
    return tokens * per_token + kept + casts


def layer_backward_bytes(arch: Architecture, setup: Setup) -> int:
    """Scratch of one layer's backward: gradients of its hidden states (2h) and MLP intermediates (3i), and for
    QLoRA the largest weight dequantised to 16 bits. An estimate; it matters only when it exceeds the loss's."""
    a = activation_bytes(setup.precision)
    tokens = setup.batch_size * (setup.seq_len + setup.virtual_in_input)
    scratch = tokens * a * (2 * arch.hidden_size + 3 * arch.intermediate_size)
    if setup.method == "qlora":
        scratch += a * max(i * o for i, o in linear_shapes(arch).values())
    return scratch


def loss_bytes(arch: Architecture, setup: Setup) -> tuple[int, int]:
    """(kept, scratch) of petune's chunked loss (petune.loss): the final hidden states of the labelled
    positions (a copy, a h each) and the logits of one chunk of at most `loss_chunk` of them: one fp32 buffer
    (and a 16-bit copy for a 16-bit head) when the head is frozen, more copies when it trains. Every position
    but the last of each sequence is assumed labelled."""
    a = activation_bytes(setup.precision)
    labelled = setup.batch_size * (setup.seq_len - 1)
    chunk = min(setup.loss_chunk, labelled)
    frozen_head = FROZEN_HEAD_LOSS_SCRATCH_BYTES + (a if a < FP32 else 0)
    per_logit = LOSS_SCRATCH_BYTES if setup.method == "full" else frozen_head
    return labelled * a * arch.hidden_size, chunk * arch.vocab_size * per_logit


def plan(arch: Architecture, setup: Setup, device: Device) -> Plan:
    """Memory of one training step of `setup` on `arch`, at its peak, by component."""
    a = activation_bytes(setup.precision)
    frozen, trainable_weights = weight_bytes(arch, setup)
    trainable = adapter_params(arch, setup)
    state = optimizer_state_bytes(trainable, setup)
    gradients = trainable * a
    head_gradient = arch.vocab_size * arch.hidden_size * a if setup.method == "full" else 0  # made first
    scratch = optimizer_scratch_bytes(arch, setup, device)
    tokens = setup.batch_size * (setup.seq_len + setup.virtual_in_input)
    final_norm = tokens * norm_bytes(arch, setup, kernel=False)
    per_layer, backward = layer_activation_bytes(arch, setup, device.kind), layer_backward_bytes(arch, setup)
    if setup.gradient_checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        saved, layer_peak = arch.num_layers * tokens * a * arch.hidden_size, per_layer + backward
    else:
        saved, layer_peak = arch.num_layers * per_layer, backward
    kept, loss_scratch = loss_bytes(arch, setup)
    loss_first = loss_scratch >= layer_peak
    fixed = {
        "frozen_weights": frozen,
        "trainable_weights": trainable_weights,
        # on a CPU the engine's library is in the process too (DeepSpeed: measured, `engine_overhead_bytes`)
        "framework_overhead": device.overhead_bytes
        + (engine_overhead_bytes(setup.strategy) if device.kind == "cpu" else 0),
    }
    backward_start = {
        **fixed,
        "gradients": head_gradient,
        "optimizer_state": state,
        "activations": saved + final_norm + (0 if loss_first else layer_peak),
        "logits_loss": kept + (loss_scratch if loss_first else 0),
    }
    optimizer_step = {
        **fixed,
        "gradients": gradients,
        "optimizer_state": state + scratch,
        "activations": 0,
        "logits_loss": 0,
    }
    total = total_params(arch)
    backward_start = per_device(backward_start, arch, setup.strategy, setup.nproc, setup.offload, total)
    optimizer_step = per_device(optimizer_step, arch, setup.strategy, setup.nproc, setup.offload, total)
    phases = [("backward start", backward_start), ("optimizer step", optimizer_step)]
    if setup.strategy == "zero3" and setup.nproc > 1 and device.kind == "cpu":
        phases.append(("model load", zero3_load(fixed, arch, setup, total)))
    phase, chosen = max(phases, key=lambda item: sum(item[1].values()))
    sizes = {name: max(moment[name] for _, moment in phases) for name in COMPONENTS}
    sizes["activations"] = saved + final_norm + layer_peak
    sizes["logits_loss"] = kept + loss_scratch
    components = {name: int(chosen[name]) for name in COMPONENTS}
    return Plan(arch, setup, device, components, sizes, phase, trainable, total)


def zero3_load(fixed: dict[str, int], arch: Architecture, setup: Setup, total: int) -> dict[str, int]:
    """Process 0 while transformers loads a model under ZeRO-3 (`deepspeed.zero.Init`): it alone reads the whole
    checkpoint (`_load_state_dict_into_zero3_model`: the others map it on the meta device), module by module
    gathering the parameters, copying the checkpoint's values in and partitioning them again, so the file's
    frozen weights are resident beside its shards. On a CPU that is this process's memory; on a GPU it is not."""
    moment = {name: 0 for name in COMPONENTS} | fixed
    moment = per_device(moment, arch, setup.strategy, setup.nproc, setup.offload, total)
    moment["frozen_weights"] += fixed["frozen_weights"]  # the checkpoint as read
    return moment


def largest_fitting(arch: Architecture, setup: Setup, device: Device, field: str, upper: int) -> int:
    """The largest `field` ("batch_size" or "seq_len"), up to `upper`, whose step fits `device`; 0 if none."""

    def fits(value: int) -> bool:
        changed = replace(setup, batch_size=value) if field == "batch_size" else replace(setup, seq_len=value)
        return plan(arch, changed, device).fits

    if not fits(1):
        return 0
    low, high = 1, upper
    if fits(high):
        return high
    while high - low > 1:  # memory grows with both, so bisect: fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low

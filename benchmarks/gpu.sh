#!/usr/bin/env bash
# The prepared GPU run of issue 5 (one call of the `device` tool, which copies this repository and returns $OUT):
# the petune-vs-peft step table on CUDA, on random weights in SmolLM2-135M's shape and in Llama-2-7B's (the
# embedded model's 98 MB GGUF file cannot travel with the repository; step time and memory depend on the
# shape, not on the weights). It uses the machine's own python3 with its torch, transformers, accelerate and
# peft, and petune from src/. First run on an H200 on 2026-12-04 (BENCHMARKS.md).
#
#   bash benchmarks/gpu.sh                                             # on the device machine
#   DEVICE=cpu SHAPES=smollm2-135m CASES=lora:bf16 STEPS=1 bash benchmarks/gpu.sh   # a dry run here
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/petune-gpu}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES-smollm2-135m llama-2-7b}  # SHAPES= (empty) skips the step table
CASES=${CASES:-lora:bf16 lora_all:bf16 prompt:bf16 prefix:bf16 lora:bf16:ckpt prefix:bf16:ckpt}
STEPS=${STEPS:-10}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

"$PYTHON" - <<'EOF' | tee "$OUT/versions.txt"
import platform, torch, transformers, peft
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, {gpu}")
EOF
for shape in $SHAPES; do
    # shellcheck disable=SC2086  # CASES is a list of words
    "$PYTHON" benchmarks/run.py --no-e2e --device "$DEVICE" --shape "$shape" --steps "$STEPS" \
        --cases $CASES --out "$OUT/$shape.md" 2>&1 | tee "$OUT/$shape.log"
done
for shape in $SHAPES; do tail -n +7 "$OUT/$shape.md"; done

# Issue 20: the library path (`model(**batch, labels=...).loss.backward()` on both sides) in bf16 on CUDA, the
# SmolLM2 shape first (issue 20's target model), then the Llama-2-7B shape. LIBRARY=0 skips it; LIBRARY_SHAPES,
# LIBRARY_REPEATS choose.
if [ "${LIBRARY:-1}" = 1 ]; then
    for shape in ${LIBRARY_SHAPES:-smollm2-135m llama-2-7b}; do
        "$PYTHON" benchmarks/library_path.py --device "$DEVICE" --shape "$shape" --allocators system \
            --cases lora:bf16 prefix:bf16 prompt:bf16 --steps "$STEPS" --repeats "${LIBRARY_REPEATS:-2}" \
            --out "$OUT/library-$shape.md" 2>&1 | tee "$OUT/library-$shape.log"
    done
fi

# Issue 18, prepared, not yet run on a machine of several GPUs (the one lent so far had one GPU, and no
# DeepSpeed or bitsandbytes installed): LoRA and QLoRA on a Llama-2-7B-shape model (random bf16 weights, made
# here: ~13 GB on disk) under FSDP2 and DeepSpeed ZeRO-3 on every GPU of the machine, 10 steps of 1 x 512
# tokens per process; each run's log (the per-process frozen-weight line, loss, tokens/s) lands in
# $OUT/engines-*.log. ENGINES=0 skips it.
if [ "${ENGINES:-1}" = 1 ] && [ "$DEVICE" = cuda ]; then
    GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    MODEL="$OUT/llama-2-7b-random"
    [ -f "$MODEL/config.json" ] || "$PYTHON" - "$MODEL" <<'EOF'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from petune.embedded import embedded_model_dir
from petune.plan import ARCHITECTURES
a = ARCHITECTURES["llama-2-7b"]
tok = AutoTokenizer.from_pretrained(embedded_model_dir())
config = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                     num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
                     num_key_value_heads=a.num_kv_heads, max_position_embeddings=4096,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
EOF
    for case in lora:fsdp lora:zero3 lora:zero3:optimizer qlora:fsdp qlora:zero3; do
        IFS=: read -r method strategy offload <<<"$case"
        name="engines-$method-$strategy${offload:+-$offload}"
        "$PYTHON" -m petune.cli train --model "$MODEL" --method "$method" --strategy "$strategy" \
            --offload "${offload:-none}" --nproc "$GPUS" --precision bf16 --max-steps 10 --batch-size 1 \
            --max-length 512 --eval-samples 0 --eval-before false --save-every 5 --overwrite true \
            --gradient-checkpointing true --output "$OUT/$name" 2>&1 | tee "$OUT/$name.log" || true
    done
fi

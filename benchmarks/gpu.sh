#!/usr/bin/env bash
# The prepared GPU run of issue 5 (one call of the `device` tool, which copies this repository and returns $OUT):
# the petune-vs-peft step table on CUDA, on random weights in SmolLM2-135M's shape and in Llama-2-7B's (the
# embedded model's 98 MB GGUF file cannot travel with the repository; step time and memory depend on the
# shape, not on the weights). It uses the machine's own python3 with its torch, transformers, accelerate and
# peft, and petune from src/. Not yet run on a GPU: no device has been lent to this project's tasks so far.
#
#   bash benchmarks/gpu.sh                                             # on the device machine
#   DEVICE=cpu SHAPES=smollm2-135m CASES=lora:bf16 STEPS=1 bash benchmarks/gpu.sh   # a dry run here
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/petune-gpu}
DEVICE=${DEVICE:-cuda}
SHAPES=${SHAPES:-smollm2-135m llama-2-7b}
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

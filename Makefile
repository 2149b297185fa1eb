# The two set-up commands of the README: `make demo` and `make test`, both from a clean clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch lies on this kind of machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo demo-finetune test venv dev lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_PIN)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.dev

demo: $(VENV)/.installed
	$(BIN)/frugallm train
	$(BIN)/frugallm generate runs/latest --prompt "def fibonacci(n):" --max-new-tokens 120

# after `make demo`: LoRA on the built-in chat set (stdlib functions), held-out loss and a sample before and after
demo-finetune: $(VENV)/.installed
	$(BIN)/frugallm finetune --from runs/latest --lr 1e-3

test: $(VENV)/.dev
	$(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info

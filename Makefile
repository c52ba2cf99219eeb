# `make demo` and `make test` work on a fresh clone with only Python installed: they create
# .venv, install the CPU build of PyTorch and distill with its extras, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint fashion-mnist bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[hf,demo,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distill run recipes/demo-minilm-sts.yaml

test: $(STAMP)
	$(BIN)/ruff check distill tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check distill tests bench
	$(BIN)/mypy distill

fashion-mnist: $(STAMP)
	$(BIN)/distill run recipes/fashion-mnist-teacher.yaml
	$(BIN)/distill run recipes/fashion-mnist.yaml

clean:
	rm -rf runs .cache

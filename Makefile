# `make demo` and `make test` work on a fresh clone with only Python installed: they create
# .venv, install the CPU build of PyTorch and distill with the extras they need, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint fashion-mnist clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[hf,dev,onnx,data]'
	touch $(STAMP)

$(VENV)/.demo: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[hf,demo]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/distill run recipes/demo-minilm-sts.yaml
	@echo
	@echo "That was recipes/demo-minilm-sts.yaml: label-free on unlabelled text, then STS-B's gold scores."
	@echo "The student: runs/demo-minilm-sts/student; the report: runs/demo-minilm-sts/report.md (.html)."
	@echo "Label-free only, all of the Brown corpus for 3 epochs (about 40 minutes on 2 cores):"
	@echo "  $(BIN)/distill run recipes/minilm-general.yaml"

test: $(STAMP)
	$(BIN)/ruff check distill tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check distill tests bench
	$(BIN)/mypy distill

fashion-mnist: $(STAMP)
	$(BIN)/python bench/fashion_mnist_methods.py

clean:
	rm -rf runs .cache

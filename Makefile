# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases imgrec is tested with (pyproject admits no newer ones).
TORCH := torch==2.14.1 torchvision==0.29.1
# Where pip finds torch: PyPI by default; on a machine without a GPU, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# installs PyTorch's CPU-only wheels instead of several GB of CUDA libraries.
TORCH_INDEX ?=
DEMO := --data digits --model lenet --epochs 30 --batch-size 32 --schedule onecycle --lr 0.002 --augment translate

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

# the test install includes the serve, export and tensorboard extras, whose tests run in `make test` too
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,serve,export,tensorboard]'
	touch $@

## demo: set up .venv, train a CNN on the embedded digits data set, print the run folder and test accuracy
demo: $(VENV)/.installed
	$(BIN)/imgrec train $(DEMO) --name demo

## test: set up .venv with the test, serve, export and tensorboard extras and run the whole test suite (real data in ../shared/data)
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache test-artifacts

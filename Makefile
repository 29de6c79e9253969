# The two set-up commands of README.md: `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false
# Stage commands say `python`: make it the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test lint ui server sync screenshots faults clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: the pinned CPU build on disk; a plain resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/newllm plots-template  # .dvc/plots_offline.html: `dvc plots show/diff` render with no network
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m newllm.warm start  # the warm stage server preloads while the store is made (README: Start-up)
	$(BIN)/newllm init-store
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/pytest -q -n auto --maxprocesses 4  # pytest-xdist workers: the stages' subprocess start-ups overlap

lint: $(STAMP)
	$(BIN)/ruff check src stages tests benchmarks

PORT ?= 5000
ui: $(STAMP)
	$(BIN)/newllm ui --port $(PORT)

SERVER_PORT ?= 5050
SERVER_DIR  := mlflow-server
server: $(STAMP)  # a team's tracking server, locally: SQL backend + proxied artifact store (README: Scaling out)
	mkdir -p $(SERVER_DIR)/artifacts
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
	    --backend-store-uri sqlite:///$(CURDIR)/$(SERVER_DIR)/mlflow.db \
	    --artifacts-destination $(CURDIR)/$(SERVER_DIR)/artifacts --serve-artifacts \
	    --host 127.0.0.1 --port $(SERVER_PORT) --workers 1

sync: $(STAMP)
	$(BIN)/newllm sync

screenshots: $(STAMP)  # README's pictures from this store and report (needs Chromium: apt-get install chromium)
	$(BIN)/newllm screenshots

faults: $(STAMP)  # the fault suite on a scratch copy of the pipeline, as a table (a few minutes)
	$(BIN)/python benchmarks/faults.py

clean:
	rm -rf data/dataset data/tokens data/checkpoints dvc_plots

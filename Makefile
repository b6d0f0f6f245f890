# nanosft: offline SFT data pipeline + lean trainer. `make help` lists the targets.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
RECIPE   ?= demo
DATA_DIR ?= data
SNAPSHOT ?=
ARGS     ?=
STAMP    := $(VENV)/.installed-stamp

.PHONY: help install fetch-data prepare-data verify-data train eval chat test test-fast bench bench-generate clean-data

help:
	@echo "make fetch-data   [RECIPE=demo] [DATA_DIR=data] [ARGS=--eval --words]  download what a recipe reads"
	@echo "make prepare-data [RECIPE=demo] [DATA_DIR=data] [ARGS=...]  build (or reuse) a verified snapshot"
	@echo "make verify-data  [RECIPE=...] [SNAPSHOT=dir]                recheck a snapshot's hashes and rows"
	@echo "make train        [SNAPSHOT=dir | RECIPE=... DATA_DIR=...] [ARGS=...]  fine-tune on a snapshot"
	@echo "make eval         [DATA_DIR=data] [ARGS=...]  ChatCORE of the latest SFT checkpoint (python -m trainer.eval)"
	@echo "make chat         [DATA_DIR=data] [ARGS=...]  talk to the latest SFT checkpoint (python -m trainer.chat)"
	@echo "make test | test-fast | bench | bench-generate"

# One local virtual environment, created on first use. torch==2.13.0 is installed only where no torch
# is present (a CPU wheel on this kind of machine); any installed torch in the project's range is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[train,test]"
	touch $(STAMP)

install: $(STAMP)

fetch-data: $(STAMP)
	$(BIN)/python -m pipeline.fetch --recipe $(RECIPE) --data-dir $(DATA_DIR) $(ARGS)

prepare-data: $(STAMP)
	$(BIN)/python -m pipeline.prepare --recipe $(RECIPE) --data-dir $(DATA_DIR) $(ARGS)

verify-data: $(STAMP)
	$(BIN)/python -m pipeline.verify $(SNAPSHOT) --recipe $(RECIPE) --data-dir $(DATA_DIR)

# The demo trains a small model on the CPU: ChatCORE's generative tasks get a small budget there (24 problems x 512
# tokens each, nanochat's default, take about a minute per evaluation on 2 cores).
DEMO_TRAIN_ARGS := --chatcore-max-sample 8 --chatcore-max-tokens 64
train: $(STAMP)
	$(BIN)/python -m trainer.train $(if $(SNAPSHOT),--snapshot $(SNAPSHOT),--recipe $(RECIPE) --data-dir $(DATA_DIR)) \
		$(if $(filter demo,$(RECIPE)),$(DEMO_TRAIN_ARGS)) $(ARGS)

eval: $(STAMP)
	$(BIN)/python -m trainer.eval --data-dir $(DATA_DIR) $(ARGS)

chat: $(STAMP)
	$(BIN)/python -m trainer.chat --data-dir $(DATA_DIR) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_prepare.py $(ARGS)

bench-generate: $(STAMP)
	$(BIN)/python bench/bench_generate.py $(ARGS)

# Only what nanosft made: snapshots and the render cache under <data dir>/nanosft (trained tokenizers and the demo's
# sources stay; `rm -rf $(DATA_DIR)/nanosft` removes all of it). A data dir's own files are never touched.
clean-data:
	rm -rf $(DATA_DIR)/nanosft/snapshots $(DATA_DIR)/nanosft/cache

# Two entry points for a fresh machine (see README.md). Both create/reuse .venv, install torch
# first (the CPU wheel on this kind of machine; a bare `torch` requirement would pull CUDA), then us.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install demo demo-rlhf test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install  ## tiny SFT on CPU, TP=2 across 2 processes (starts over: removes an earlier runs/tiny-sft)
	rm -rf runs/tiny-sft
	$(VENV)/bin/alfred-train sft configs/tiny-sft.yaml run.dir=runs/tiny-sft

demo-rlhf: install  ## the whole pipeline on the synthetic task: SFT -> RM -> PPO
	$(PY) -m alfred_train.demo --out runs/demo

test: install
	$(PY) -m pytest -q -ra tests

bench: install
	$(PY) bench/bench_sft.py

clean:
	rm -rf runs .pytest_cache

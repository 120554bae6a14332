# `make demo` and `make test` work on a fresh machine: they make .venv and install with the pinned constraints.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@# torch first, pinned: an unpinned torch would pull several GB of CUDA wheels
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	@# Syne Tune's MOASHA for tests/test_peers.py needs only dill; its full dependencies (xgboost, NCCL:
	@# 700 MB) come with '.[bench]'
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps syne-tune
	touch $(STAMP)

demo: install
	$(BIN)/kdsearch run --num-samples 24
	$(BIN)/kdsearch export --max-latency-ms 2 --out exports/demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/trainer_overhead.py
	$(BIN)/python benchmarks/compression.py

clean:
	rm -rf $(VENV) mlflow.db mlartifacts ray_results exports build *.egg-info

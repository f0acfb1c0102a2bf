# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# reinstall only when the dependency list changes
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install test test-fast lint bench gpu-check demo study clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo 'installing mmrl and its dependencies into .venv (the first time takes a few minutes)'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet -e '.[dev,demo]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# the full suite (CI's command), in two pytest-xdist workers of one intra-op thread each: a test
# module stays on one worker, and so do all the tests of the prepared corpora (tests/conftest.py)
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

# everything but the tests marked slow (multi-process, demo, corpus-preparing), in two worker
# processes of one intra-op thread each: about a minute on 2 cores
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not slow" tests

# lint and import order (ruff, configured in pyproject.toml); CI runs it before the tests
lint: install
	$(BIN)/ruff check .

bench: install
	for b in pooling loader train eval text_cache; do $(BIN)/python benchmarks/$$b.py || exit 1; done

# on one CUDA GPU, under 8 minutes: the gpu tests, mmrl train vs open_clip's trainer (ViT-B/16 GGeM, bf16),
# MFU, peak memory, GGeM vs average pooling; one JSON line last (without CUDA: one line, skipped, exit 0)
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py

# the main job: prepare the real corpora (data/), train, evaluate, write runs/demo/report.md
demo: install
	$(BIN)/mmrl demo $(ARGS)

# the pooling study: tok/avg/gem/ggem/cgem x 3 seeds, runs/study/study.md
study: install
	$(BIN)/mmrl demo --study $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# reinstall only when the dependency list changes
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install test bench demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo 'installing mmrl and its dependencies into .venv (the first time takes a few minutes)'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	for b in pooling loader train eval; do $(BIN)/python benchmarks/$$b.py || exit 1; done

demo: install
	@echo "make demo arrives with the demo issue (#6): training and evaluation on the real corpora are not built yet." >&2
	@exit 2

clean:
	rm -rf $(VENV) build *.egg-info

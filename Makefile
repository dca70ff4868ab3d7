# Two entry points for a fresh machine (each creates .venv and installs what it needs):
#   make demo   - TRADES and TRADES + CSR side by side, per class, on the embedded digits data set
#   make test   - lint and the whole test suite
#   make docs   - the documentation site (docs/ -> docs/_build/html), warnings as errors
PYTHON ?= python3
# test processes (pytest-xdist): the suite is mostly single-threaded, so one per core
TEST_WORKERS ?= 2
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test lint docs bench-digits bench-fairness clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(DOCS_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $(DOCS_STAMP)

demo: $(STAMP)
	$(BIN)/confspec-demo

lint: $(STAMP)
	$(BIN)/ruff check confspec_lightning tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist worksteal

# a broken link, a missing reference or a docstring that does not render fails the build
docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench-digits: $(STAMP)
	$(BIN)/python benchmarks/digits/run.py

bench-fairness: $(STAMP)
	$(BIN)/python benchmarks/fairness/run.py --protocol digits

clean:
	rm -rf $(VENV) runs lightning_logs docs/_build

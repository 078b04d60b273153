# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/stylestream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## Run the whole system on the embedded defaults (local broker, local files, tiny models).
demo: $(BIN)/stylestream
	$(BIN)/stylestream demo

## Lint, then every test (slow end-to-end ones included). "No tests ran" is a failure.
test: $(BIN)/stylestream lint
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(BIN)/stylestream
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) stylestream-data .pytest_cache .ruff_cache

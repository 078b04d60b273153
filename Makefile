# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint prism flink browser redis clean

$(BIN)/stylestream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## Run the whole system on the embedded defaults (local broker, local files, tiny models).
demo: $(BIN)/stylestream
	$(BIN)/stylestream demo

# The broker the whole suite runs on: kafka (Apache Kafka, needs Java; CI sets this), tansu, or auto
# (kafka where Java is present). The smoke tests then run on Tansu too, so both brokers keep working.
TEST_BROKER ?= auto
# pytest on broker $(1) with arguments $(2); "no tests ran" (exit 5) is a failure
PYTEST = rc=0; STYLESTREAM_TEST_BROKER=$(1) $(BIN)/python -m pytest --durations=30 $(2) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; [ $$rc -eq 0 ]

## Prism, Beam's portable runner for the streaming pipeline: `go install` at the SDK's Beam release,
## cached under ~/.cache/stylestream/prism/ (about a minute the first time).
prism: $(BIN)/stylestream
	$(BIN)/python -m stylestream.pipelines.prism

## The Flink job's environment: PyFlink and the project in a virtual environment of their own, and
## Flink's Kafka connector from Maven Central, under ~/.cache/stylestream/flink/ (a few minutes once).
flink: $(BIN)/stylestream
	$(BIN)/python -m stylestream.pipelines.flink_setup

## Debian's chromium for the page's browser tests (Playwright drives it; no browser download at test time).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@$(CHROMIUM) --version

## Debian's redis-server: the tests start one on loopback for API replicas that share their rate limits.
redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

## Lint, then every test (slow end-to-end ones included), then the smoke tests on Tansu (from the
## files that hold them: collecting every module again costs half a minute).
SMOKE_FILES = $(shell grep -l 'mark.smoke' tests/test_*.py)
test: $(BIN)/stylestream lint prism flink browser redis
	$(call PYTEST,$(TEST_BROKER),)
	$(call PYTEST,tansu,-m smoke $(SMOKE_FILES))

lint: $(BIN)/stylestream
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) stylestream-data .pytest_cache .ruff_cache test-artifacts

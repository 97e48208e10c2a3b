# The two commands of the README: `make run` and `make test`. Everything they need is
# installed here, into .venv/ (Python) and tests/js/node_modules/ (npm test peers).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPM_STAMP := tests/js/node_modules/.installed

.PHONY: setup run test test-fast lint bench clean

$(STAMP): pyproject.toml setup.py $(wildcard plugin/ruletag/*/*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

$(NPM_STAMP): tests/js/package.json
	cd tests/js && npm install --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

setup: $(STAMP) $(NPM_STAMP)

## run: set up, then run ruletag on the embedded default (bundled seed rules, default pipeline)
run: $(STAMP)
	$(BIN)/ruletag serve --config pipelines/default.yaml

## test: set up, lint (ruff check, ruff format --check, mypy), run the whole test suite (slow
## fault tests included) and the pipeline tests.
## The whole-corpus tests run only with RULETAG_CORPUS set to a folder holding sigma/ and
## elastic/ (e.g. `RULETAG_CORPUS=../shared/rules make test`); otherwise the pinned sample in
## tests/data/corpus runs and pytest prints one line saying the corpus tests were not run.
test: setup lint
	$(BIN)/ruletag test pipelines/*.yaml
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

## lint: the checks pre-commit runs too (.pre-commit-config.yaml)
lint: $(STAMP)
	$(BIN)/ruff check plugin tests bench scripts
	$(BIN)/ruff format --check plugin tests bench scripts
	$(BIN)/mypy

## bench: the load benchmark; BENCH_RULES (a folder holding sigma/ and elastic/, by default
## ../shared/rules when it exists) adds the corpus rule sets to none and seeds.
BENCH_RULES ?= $(wildcard ../shared/rules)
bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(if $(BENCH_RULES),--corpus $(BENCH_RULES))

clean:
	rm -rf $(VENV) tests/js/node_modules .pytest_cache

# Every target CI needs; .ci/run calls `make test` after starting the services.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint typecheck pytest bench clean

$(BIN)/stream-cps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $@

install: $(BIN)/stream-cps

demo: install  ## the main job on an embedded PostgreSQL with sample data
	$(BIN)/stream-cps demo

lint: install  ## ruff check + format check + the import contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q

test: lint typecheck pytest  ## lint + type check + every test against real services

bench: install
	$(BIN)/python bench/stitch.py

clean:
	rm -rf .state build dist *.egg-info

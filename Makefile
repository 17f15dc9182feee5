# Two entry points (see README): `make demo` runs the product, `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
DEMO_ARGS ?=

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/explainctl explain client/explainctl/examples/*.jpg --out $(OUT) $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint
	bash scripts/test.sh

bench: install
	PYTHONPATH=. $(BIN)/python benchmarks/engine.py --model tests.models:tiny_classifier --image-size 64 --mask-size 16 --batch-size 16

clean:
	rm -rf $(VENV) out .pytest_cache

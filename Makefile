# Two entry points (see README): `make demo` runs the product, `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: install demo test lint format bench clean browser slurm reliability

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/explainctl demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two test processes (pytest-xdist): most tests wait on real services, workers and faults.
# Each takes a Redis database of its own; the modules that share hosts or a Slurm cluster
# run whole in one process (their xdist_group).
test: install lint browser slurm
	bash scripts/test.sh -n 2 --dist loadgroup

# The fault-injection and hostile-input suites alone; they print the reliability table.
reliability: install browser slurm
	bash scripts/test.sh -m reliability

# The report is tested in a real headless browser: Debian's chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# deploy/slurm/ runs on a one-node Slurm cluster that the tests start: Debian's daemons.
slurm:
	@(for program in slurmctld slurmd munged sbatch; do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$program || exit 1; done) >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    slurmctld slurmd munge slurm-client >/dev/null)

bench: install
	PYTHONPATH=. $(BIN)/python benchmarks/engine.py --model tests.support.models:tiny_classifier --image-size 64 --mask-size 16 --batch-size 16

clean:
	rm -rf $(VENV) out .pytest_cache

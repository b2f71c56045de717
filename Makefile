# Each target does its own set-up: a virtual environment in .venv with the pinned requirements.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast test-gpu lint mutation demo showcase downstream task-demo prune-demo reference clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)

# ruff (lint, then format check), mypy (pyproject.toml: pretrain, data_prep), mypy of launch/ from inside it (launch/ is
# no package, and its pretrain.py would shadow the package's name), hadolint
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	cd launch && $(abspath $(VENV))/bin/mypy --config-file ../pyproject.toml pretrain.py slurm.py handover.py
	$(VENV)/bin/hadolint Dockerfile

test: setup lint
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow and not slurm"

# the CUDA tests (marker gpu; deselected on CPU) with the machine's own CUDA torch: docs/testing.md, "GPU tests"
test-gpu:
	scripts/gpu_tests.sh

# mutation testing of the numerical core with mutmut, in one run, then the score per module and the surviving
# mutants (docs/testing.md "Mutation testing"; not part of make test: see there for its time on 2 cores).
# MUTATION_MODULES="pretrain.masking pretrain.losses" runs only those modules.
mutation: setup
	scripts/mutation.sh $(VENV)/bin $(MUTATION_MODULES)

demo: setup
	scripts/demo.sh $(PY)

# the demo trained 10 times longer (configs/showcase.json, about 27 min on 2 cores), its report with 3 downstream seeds
showcase: setup
	DEMO_CONFIG=configs/showcase.json DEMO_DOWNSTREAM_SEEDS=3 scripts/demo.sh $(PY)

# every embedded labeled task, 3 seeds, on the demo's run (make demo first), the demo's downstream protocol (mean-pooled
# head, 600 training examples): docs/demo.md has its table and time
downstream: setup
	$(PY) -m pretrain.downstream --run runs/demo --output runs/demo/downstream-all --seeds 3 --head mean --max-train 600 \
		--task embedded:rotten-tomatoes --task embedded:wiki-topic --task embedded:trec \
		--task embedded:movie-sentiment-score

task-demo: setup
	scripts/task_demo.sh $(PY)

prune-demo: setup
	scripts/prune_demo.sh $(PY)

reference: setup
	$(PY) scripts/update_readme_reference.py

clean:
	rm -rf $(VENV) .pytest_cache mutants

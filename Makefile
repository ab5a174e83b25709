# Two commands do all the set-up on a fresh machine:
#   make run    set up, then run the main job (python launch/search.py --space lstm.yaml)
#   make test   set up, then run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# CPU build by default (it lies on this machine's disk). On a CUDA machine: make setup TORCH_SPEC='torch>=2.4,<3'
TORCH_SPEC ?= torch==2.13.0
SPACE   ?= lstm.yaml
BUDGET  ?= local
export RAY_USAGE_STATS_ENABLED=0

.PHONY: setup run test test-slow ui bench render clean-cache

# pip runs with -q (its output is thousands of lines); each step says first what it installs.
$(BIN)/.metafx-installed: pyproject.toml
	@echo "==> creating the virtual environment $(VENV) with $(PY)"
	$(PY) -m venv $(VENV)
	@echo "==> upgrading pip"
	$(BIN)/pip install -q --upgrade pip
	@echo "==> installing PyTorch ($(TORCH_SPEC)); CPU build unless TORCH_SPEC says otherwise"
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	@echo "==> installing metafx and its dependencies (Ray, Optuna, MLflow, DAWDreamer, auraloss, pytest, ...)"
	$(BIN)/pip install -q -e '.[test]'
	@echo "==> set-up done: run commands with $(BIN)/python, or activate the environment with  . $(BIN)/activate"
	touch $@

setup: $(BIN)/.metafx-installed

run: setup
	@echo "==> python launch/search.py --space $(SPACE) --budget $(BUDGET)"
	$(BIN)/python launch/search.py --space $(SPACE) --budget $(BUDGET)

test: setup
	@echo "==> python -m pytest -q (the default suite; the slow end-to-end tests: make test-slow)"
	$(BIN)/python -m pytest -q

# Slow end-to-end tests (real browser on the MLflow UI, resume after SIGKILL, ...).
test-slow: setup
	bash .ci/browser-deps.sh
	$(BIN)/python -m pytest -q -m slow

# The MLflow UI on the embedded store, loopback only.
ui: setup
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

render: setup
	$(BIN)/python launch/render.py --space $(SPACE) --budget $(BUDGET)

bench: setup
	$(BIN)/python launch/bench.py render --budget $(BUDGET)
	$(BIN)/python launch/bench.py metastep --budget $(BUDGET)

clean-cache:
	rm -rf .cache ray_results

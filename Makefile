# Two commands do all set-up on a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export FER2013_DIR ?= $(abspath ../shared/data/fer2013)
FMNIST_DEB := /usr/share/datasets/fashion-mnist

.PHONY: setup data run test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's package when we are root with apt; otherwise torchvision downloads it.
data:
	@if [ ! -f $(FMNIST_DEB)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi

run: setup data
	mlflow run . -e fmnist_cnn --env-manager local

test: setup data postgres chromium
	$(BIN)/python -m pytest

test-fast: setup data
	$(BIN)/python -m pytest -m "not slow and not services"

# The team stack on loopback (PostgreSQL, SeaweedFS S3, mlflow server): data in .cnnlab/stack, survives down/up.
.PHONY: postgres stack-up stack-down stack-status
postgres:
	@test -x /usr/lib/postgresql/15/bin/initdb || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15; }

# Debian's Chromium and its WebDriver, for the demo page's browser test (tests/test_demo.py).
.PHONY: chromium
chromium:
	@test -x /usr/bin/chromedriver || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver \
		fonts-liberation; } || { echo "make chromium: as root, apt-get install chromium chromium-driver" >&2; exit 1; }

stack-up: setup postgres
	$(BIN)/cnnlab stack up

stack-down:
	$(BIN)/cnnlab stack down

stack-status:
	$(BIN)/cnnlab stack status

clean:  # keeps .cnnlab/stack (the team stack's data)
	rm -rf .cnnlab/checkpoints mlflow.db mlruns mlartifacts reports optuna.db

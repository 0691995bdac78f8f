# The README's two commands: `make run` (set up + the main job) and `make test` (set up + tests).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This machine's pip.conf names local wheel folders that may be absent: drop those warnings.
# The build backend is hatchling: its editable install is a plain .pth entry for the project
# folder, installed without notices (setuptools prints an "Editable installation" warning in
# every editable mode).
PIP_FILTER := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup data run test test-fast lint clean loopback

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | $(PIP_FILTER)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | $(PIP_FILTER)
	$(PY) -c "import cmd_ray, ray, torch, torchvision, pyarrow, wandb"
	touch $@

setup: $(VENV)/.installed

data:
	bash launch/get_data.sh

# The smoke sweep on a local embedded Ray; each `make run` is a new sweep folder under runs/sweeps/.
run: setup data
	$(PY) launch/tune.py --config launch/configs/fmnist-smoke.yaml --set sweep.name=fmnist-smoke-$$(date +%Y%m%d-%H%M%S)

# Everything (what CI runs), with the 15 slowest tests named at the end so their time stays visible.
test: setup data
	$(PY) -m pytest -q --durations=15 tests

# The unit tier for the edit-run loop: no Ray start, no sweep (about a minute on 2 cores).
test-fast: setup data
	$(PY) -m pytest -q -m "not ray" --durations=5 tests

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache

# `ray up` / `ray submit launch/tune.py` / `ray down` against Ray's on-premise provider on
# 127.0.0.1 (needs root: installs openssh-server + rsync, adds a user, starts sshd).
loopback: setup data
	bash launch/loopback.sh

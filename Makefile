# One command installs and runs the main job (`make run`); one runs the tests (`make test`).
# Everything lives in a local virtual environment, $(VENV).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= dev,viz,hf
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run smoke test test-fast lint format bench browser clean

install: $(VENV)/.installed

# CPU machines get the CPU build of torch first (a bare `torch` requirement would pull a
# multi-GB CUDA build); machines with an NVIDIA driver keep the default PyPI wheel.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch>=2.2"; \
	 else $(PIP) install -q "torch==2.13.0"; fi
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

run: install
	$(VENV)/bin/isup run

smoke: install
	$(VENV)/bin/isup run --preset smoke

test: install browser
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not gemma and not browser"

# Debian's chromium for the HTML report and dashboard tests (needs root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

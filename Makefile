# One command installs and runs the main job (`make run`); one runs the tests (`make test`).
# Everything lives in a local virtual environment, $(VENV).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRAS ?= dev,viz,hf
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DEVICE ?= auto
GPU_CHECK_ARGS ?= $(if $(filter cpu,$(DEVICE)),--quick)
WHEELHOUSE ?= wheelhouse
GPU_PYTHON ?= python3
GPU_WHEEL_PY ?= 3.12

.PHONY: install run smoke test test-fast lint format bench browser clean gpu-check gpu-install gpu-wheels

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

# The suite on one process per core (at most TEST_WORKERS_MAX), each test module on one worker:
# most of the slowest tests wait on Prefect servers, workers and subprocesses.
TEST_WORKERS ?= auto
TEST_WORKERS_MAX ?= 4

test: install browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses $(TEST_WORKERS_MAX) --dist loadscope

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses $(TEST_WORKERS_MAX) --dist loadscope \
	  -m "not gemma and not browser"

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

# The prepared GPU check: CUDA tests, each benchmark's GPU mode and `isup run` on the defaults,
# summarised in bench/out/gpu-check/summary.{md,json} (`make gpu-check DEVICE=cpu`: the quick
# CPU run). See docs/gpu-check.md.
gpu-check:
	@t0=$$(date +%s); $(MAKE) --no-print-directory gpu-install || exit 1; \
	if [ -x "$(PY)" ]; then py=$(PY); else py=$(GPU_PYTHON); fi; \
	ISUP_GPU_CHECK_T0=$$t0 $$py bench/gpu_check.py --device $(DEVICE) $(GPU_CHECK_ARGS)

# With a $(WHEELHOUSE) folder and no $(VENV) (a GPU machine without a package registry, whose
# $(GPU_PYTHON) already holds a CUDA build of torch), the project goes into that Python's
# environment from the wheelhouse alone; otherwise `make install` builds $(VENV).
gpu-install:
	@if [ -d "$(WHEELHOUSE)" ] && [ ! -x "$(PY)" ]; then \
	  echo "installing from $(WHEELHOUSE) into $$(command -v $(GPU_PYTHON))"; \
	  $(GPU_PYTHON) -m pip install -q --no-index --find-links "$(WHEELHOUSE)" -e .; \
	elif [ ! -x "$(PY)" ] && ! command -v $(PYTHON) >/dev/null 2>&1; then \
	  echo "gpu-install: no $(WHEELHOUSE)/ folder and no $(PYTHON) to build $(VENV) with;" \
	    "run 'make gpu-wheels' where a package registry is reachable and bring" \
	    "$(WHEELHOUSE)/ along, or set PYTHON=" >&2; exit 1; \
	else \
	  $(MAKE) --no-print-directory install; \
	fi

# Wheels for `make gpu-check` on a machine without a package registry (Python $(GPU_WHEEL_PY)).
gpu-wheels: install
	$(PY) bench/gpu_wheels.py --dest $(WHEELHOUSE) --python-version $(GPU_WHEEL_PY)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

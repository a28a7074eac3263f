# promptpaint: `make demo` sets up and runs the offline demo, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS ?= .models/tiny
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR := $(CURDIR)/.cache/ultralytics
export COMET_DISABLE_AUTO_LOGGING := 1
export COMET_ERROR_TRACKING_ENABLE := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup browser demo test test-fast lint bench reliability clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(MODELS)/.built: $(VENV)/.installed $(wildcard promptpaint/models/*.py) promptpaint/tiny.py
	$(VENV)/bin/promptpaint models build-tiny $(MODELS)
	touch $@

demo: $(MODELS)/.built
	$(PY) -m promptpaint.samples demo/inputs -n 12 --broken
	$(VENV)/bin/promptpaint run examples/replace.yaml --set models_dir=$(MODELS) \
	    --set input=demo/inputs --set output=demo/output --set inpaint.steps=10
	@echo
	@echo "Edited images: demo/output/images/   masks: demo/output/masks/   manifest: demo/output/manifest/"
	@echo "(tiny random-weight models: the repainted regions are noise; the plumbing is real)"

# The playground test (tests/test_playground.py) drives Debian's Chromium through playwright.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update && $$SUDO apt-get install -y chromium; \
	fi

test: setup browser
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not heavy and not reliability"

lint: setup
	$(VENV)/bin/ruff check promptpaint tests benchmarks
	$(VENV)/bin/ruff format --check promptpaint tests benchmarks

reliability: setup
	$(PY) benchmarks/reliability_report.py

bench: $(MODELS)/.built
	$(PY) benchmarks/bulk_edit_overhead.py --models-dir $(MODELS)
	$(PY) benchmarks/lineage_overhead.py --models-dir $(MODELS)

clean:
	rm -rf demo .models .cache

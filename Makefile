# Interpretable Transformers — every target does its own set-up and is idempotent.
#   make book   set up, execute the notebooks (cached) and build _build/html/index.html
#   make test   set up, run the unit tests, doctests and notebook tests
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
JOBS   ?= 2
STAMPS := .setup-stamps
WEB_DIR := book/static
WEB_ASSETS := $(WEB_DIR)/mathjax/tex-chtml.js $(WEB_DIR)/widgets/embed.js
NOTEBOOKS := $(sort $(wildcard nbs/*.ipynb))

# Offline by default: no loader may reach a model hub (ARCHITECTURE.md, "Offline assets").
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

LAB_PORT ?= 8888   # the book's launch buttons open http://localhost:$(LAB_PORT)/lab/tree/nbs/...

PYTEST_ARGS ?=
PYTEST := $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --nbval-lax --nbval-current-env \
          --nbval-sanitize-with tests/nbval_sanitize.cfg $(PYTEST_ARGS)

.PHONY: help setup setup-system book student test test-unit test-notebooks test-offline check-portable lab serve refresh-artefacts bench lint clean distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: $(STAMPS)/python setup-system $(WEB_ASSETS)  ## virtual env, pinned packages, system data, MathJax and widget JS

$(STAMPS)/python: pyproject.toml requirements-nodeps.txt tools/setup_python.sh
	@tools/setup_python.sh "$(PYTHON)" "$(VENV)"
	@mkdir -p $(STAMPS) && touch $@

setup-system: $(STAMPS)/python  ## Debian data packages (Fashion-MNIST, WordNet, Austen); quick when present
	@tools/setup_system.sh "$$($(BIN)/python -c 'from helpers import common; print(common.cache_dir())')" "$(BIN)/python"

$(WEB_ASSETS) &: tools/setup_web_assets.sh | setup-system
	@tools/setup_web_assets.sh $(WEB_DIR)

book: setup  ## execute the notebooks, JOBS at a time (jupyter-cache), and build the HTML book
	$(BIN)/python tools/execute_book.py --jobs $(JOBS)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "Book built: _build/html/index.html  (browse it with 'make serve')"

student: setup  ## the book without solutions, to hand out: _build/student/_build/html (checks still work)
	$(BIN)/python tools/execute_book.py --jobs $(JOBS) --path-output _build/student
	$(BIN)/jupyter-book build . --config "$$($(BIN)/python tools/book_config.py _build/student --student)" \
	    --path-output _build/student --warningiserror --keep-going
	@echo "Student edition built: _build/student/_build/html/index.html"

test: setup  ## unit tests, doctests and notebook tests (nbval, lax)
	$(PYTEST) helpers tests $(NOTEBOOKS)

test-unit: setup  ## unit tests and doctests only
	$(PYTEST) helpers tests

test-notebooks: setup  ## notebook tests only
	$(PYTEST) $(NOTEBOOKS)

test-offline: setup  ## the full test suite inside a network namespace that has only loopback
	@if [ "$$(id -u)" = 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi; \
	"$${ns[@]}" sh -c 'ip link set lo up 2>/dev/null || true; exec "$$@"' sh \
	  $(PYTEST) helpers tests $(NOTEBOOKS)

check-portable: setup  ## re-execute the notebooks under 1 thread, every core and AVX2 kernels; report values that moved
	$(BIN)/python tools/check_portable.py $(NB)

lab: setup  ## JupyterLab on the notebooks with the `helpers` kernel
	$(BIN)/python -m ipykernel install --sys-prefix --name helpers --display-name "Python (helpers)" >/dev/null
	$(BIN)/jupyter lab --ServerApp.root_dir=. --ServerApp.port=$(LAB_PORT) --ServerApp.port_retries=0 $(if $(filter 0,$(shell id -u)),--allow-root) nbs

serve:  ## browse the built book on http://127.0.0.1:8000
	@test -f _build/html/index.html || { echo "No book yet: run 'make book' first."; exit 1; }
	$(BIN)/python -m http.server --directory _build/html --bind 127.0.0.1 8000

refresh-artefacts: setup  ## rebuild the notebooks' committed artefacts (helpers/weights/*/) from scratch
	@tools/refresh_artefacts.sh $(BIN)/python

bench: setup  ## per-notebook wall time and peak RSS -> benchmarks/results/book_build.json + README table
	$(BIN)/python benchmarks/book_build.py

lint: setup  ## ruff on the package, tests, benchmarks and notebooks
	$(BIN)/ruff check helpers tests benchmarks nbs

clean:  ## remove the built book and caches of the build (keeps the venv and downloaded data)
	rm -rf _build .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean  ## also remove the virtual environment and local MathJax
	rm -rf $(VENV) $(STAMPS) $(WEB_DIR)/mathjax $(WEB_DIR)/widgets

# Two commands: `make demo` (install + run the pipeline on a bundled phantom) and `make test` (install + the SPINEPS
# venv + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q
# SPINEPS 2.1.3 in its own venv (never a dependency of ours), for tests/test_spineps_compat.py and the side-by-side
# benchmark; its set-up script writes the stamp as its last step, once SPINEPS imports
SPINEPS_SETUP := benchmarks/spineps_side_by_side/setup_spineps_env.sh
SPINEPS_VENV := benchmarks/spineps_side_by_side/.venv-spineps
SPINEPS_STAMP := $(SPINEPS_VENV)/.spineps-ready

.PHONY: install browser spineps-env demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray]'
	@# PyPI's torchvision (pulled by timm <- dynamic-network-architectures) fails to import beside the CPU
	@# torch 2.13 wheel; nothing here imports it (networks are built from plans.json, never by trainer lookup).
	$(PY) -m pip uninstall -q -y torchvision || true
	touch $(STAMP)

install: $(STAMP) browser

# Debian's chromium for the cohort report's browser test (tests/test_cohort_report.py); as root with apt-get only,
# elsewhere a note (the test is skipped without it, and fails under CI=true)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	  else echo "chromium not found: install it (apt-get install chromium) for the cohort report's browser test"; fi; }

# Rebuilt when the set-up script changes (pip updates the existing venv in place)
$(SPINEPS_STAMP): $(SPINEPS_SETUP)
	SPINEPS_VENV=$(CURDIR)/$(SPINEPS_VENV) bash $(SPINEPS_SETUP) $(PYTHON)

spineps-env: $(SPINEPS_STAMP)

demo: install
	$(VENV)/bin/spineps-like demo --out demo_output

# A failed SPINEPS set-up does not stop the tests: its compat tests then skip with the reason, or fail under CI=true
# (.ci/run sets it), as the browser test does without chromium. `make test NO_SPINEPS=1` does not try to build it.
test: install
	@if [ -n "$(NO_SPINEPS)" ]; then echo "NO_SPINEPS set: the SPINEPS venv is not built"; \
	else $(MAKE) --no-print-directory spineps-env || \
	  echo "SPINEPS venv not built (above): tests/test_spineps_compat.py's SPINEPS tests skip, or fail under CI"; fi
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output $(SPINEPS_VENV)

# Two commands: `make demo` (install + run the pipeline on a bundled phantom) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser demo test clean

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

demo: install
	$(VENV)/bin/spineps-like demo --out demo_output

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_output

# Two commands: `make demo` (install + run the pipeline on a bundled phantom) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray]'
	@# PyPI's torchvision (pulled by timm <- dynamic-network-architectures) fails to import beside the CPU
	@# torch 2.13 wheel; nothing here imports it (networks are built from plans.json, never by trainer lookup).
	$(PY) -m pip uninstall -q -y torchvision || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/spineps-like demo --out demo_output

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_output

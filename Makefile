# Everything runs inside .venv, created on demand from requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-all bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m ""

demo: venv
	$(PY) -m vqakd.demo

bench: venv
	bash bench/gpu_check.sh --cpu

clean:
	rm -rf results/demo data/demo .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

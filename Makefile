# Two commands for a newcomer: `make demo` and `make test`. Both set up what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup lint bench proto

demo: $(STAMP)
	$(VENV)/bin/vfl demo

test: $(STAMP)
	$(PY) -m pytest

setup: $(STAMP)

# torch==2.13.0 first: on these machines pip takes that CPU build from a local file;
# any other torch request would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check protocols psi vfl tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/paillier.py

proto: $(STAMP)
	$(PY) -m protocols.generated.regenerate

# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The torch build is chosen here, not by the package: on a machine without a GPU this pins the CPU
# build; override for CUDA, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/longdream train preset=quickstart run_dir=runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# the edit loop: everything but the end-to-end runs marked slow (`make test` runs them all)
test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/longdream bench update

clean:
	rm -rf $(VENV) runs

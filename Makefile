# The two commands a newcomer needs: `make example` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export MERGING_CACHE ?= $(CURDIR)/.cache

.PHONY: example test quick lint bench clean-venv

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: the CPU build of 2.13.0 is on disk; an unpinned torch would pull a CUDA build.
$(VENV)/.installed-base: $(PY) pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[plots]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PIP) -c constraints.txt -e '.[test,plots]'
	touch $@

example: $(VENV)/.installed-base
	$(VENV)/bin/merging example-base
	$(VENV)/bin/merging inspect "$$($(VENV)/bin/merging example-base)"

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check merging cli tests
	$(PY) -m pytest -q

quick: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not model"

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check merging cli tests

clean-venv:
	rm -rf $(VENV)

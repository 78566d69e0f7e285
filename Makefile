# The two commands a newcomer needs: `make example` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export MERGING_CACHE ?= $(CURDIR)/.cache

.PHONY: example train-examples test quick lint bench clean-venv

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: the CPU build of 2.13.0 is on disk; an unpinned torch would pull a CUDA build.
$(VENV)/.installed-base: $(PY) pyproject.toml constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[plots,verify]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PIP) -c constraints.txt -e '.[test,plots,verify]'
	touch $@

EXAMPLE_INPUTS := $(foreach s,add sort reverse translate sentiment,$(s)=examples/adapters/$(s))
EXAMPLE_EVALS := $(foreach s,add sort reverse translate sentiment,--eval $(s)=examples/data/$(s).jsonl)

# The main job: compare every strategy on the bundled adapters and regenerate reports/example/; with svd under
# global budgets the size of ranks 4 and 16, and iso_c with its weights tuned in 16 merges measured (the
# tuned row that keeps every skill best; a tuned cat measured worse on the reporting half): every retention
# is then on the evals' reporting half.
example: $(VENV)/.installed-base
	base="$$($(VENV)/bin/merging example-base)" && $(VENV)/bin/merging compare $(EXAMPLE_INPUTS) --base "$$base" \
		--strategies all --ranks 4,16,64 --budget r4,r16 --tune 16 --tune-strategy iso_c $(EXAMPLE_EVALS) -o reports/example --force

# Retrain the bundled adapters (a few minutes on 2 cores); `make example` does not need this.
train-examples: $(VENV)/.installed-test
	$(PY) examples/train.py

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check merging cli tests examples benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

quick: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not model and not system and not slow"

# ruff everywhere; mypy on the public API (merging/__init__.py and what it exports: [tool.mypy] files)
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check merging cli tests examples benchmarks
	$(PY) -m mypy

# Timing and memory against PEFT, and svd's global budget against uniform rank (not part of `make test`);
# writes reports/benchmarks/.
bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.budget

clean-venv:
	rm -rf $(VENV)

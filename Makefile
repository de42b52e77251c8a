# Two entry points for a fresh machine (see README):
#   make demo   create .venv, install attnc, compile examples/specs/*.attn, run and check them against oracles
#   make test   the same install plus dev extras, then the test suite (this is what CI runs)
#   make golden rewrite tests/golden/ (generated modules and kernels files) after an intended codegen change
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this project's machines; a plain `torch` would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -q -n 2 -m "not slow"  # slow: the long and not-yet-CI-sized cases (pytest -m slow)

.PHONY: demo test golden lint format clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,hf]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PY=$(PY) .ci/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

golden: $(VENV)/.installed
	ATTNC_REGEN_GOLDEN=1 $(PY) -m pytest -q -n 0 tests/test_codegen_module.py tests/test_delta_spec.py -k golden
	git status --short tests/golden

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

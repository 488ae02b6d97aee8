# Two commands do all set-up on a fresh machine with only Python >= 3.11:
#   make demo   creates .venv, installs jaxfactor[examples], runs the demo
#               (examples/compress_digits.py: a CNN trained on real digits,
#               factorized in every format at three FLOP budgets)
#   make test   creates .venv, installs jaxfactor[test], runs the test suite
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?= -n auto

.PHONY: demo test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-examples
	$(VENV)/bin/python examples/compress_digits.py

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

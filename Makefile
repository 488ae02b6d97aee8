# Two commands do all set-up on a fresh machine with only Python >= 3.11:
#   make demo   creates .venv, installs jaxfactor[examples], runs the demo
#               (examples/compress_digits.py: a CNN trained on real digits,
#               factorized in every format at three FLOP budgets)
#   make test   creates .venv, installs jaxfactor[test], runs the test suite
# The other checks CI runs (.ci/run), each installing what it needs into the
# same .venv:
#   make lint       ruff check and ruff format --check     (jaxfactor[lint])
#   make typecheck  mypy over the package                  (jaxfactor[lint])
#   make docs       mkdocs build --strict into site/       (jaxfactor[docs])
#   make sanitize   the native kernel's tests under ASan   (jaxfactor[test])
#                   and UBSan (tools/sanitize.sh)
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?= -n auto --dist worksteal

.PHONY: demo test lint typecheck docs sanitize clean

# uv installs the same packages as pip, from PyPI, in a fifth of the time.
# --compile-bytecode writes the .pyc files at install, as pip does: without
# them every Python process (each test worker, each example the tests run)
# compiles jax's and flax's sources again, seconds each, wherever
# PYTHONDONTWRITEBYTECODE is set.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/bin/uv: | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet uv

$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(VENV)/bin/python -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-examples
	$(VENV)/bin/python examples/compress_digits.py

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed-lint
	$(VENV)/bin/mypy

docs: $(VENV)/.installed-docs
	$(VENV)/bin/mkdocs build --strict -d site

sanitize: $(VENV)/.installed-test
	PYTHON="$(abspath $(VENV))/bin/python" bash tools/sanitize.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache site

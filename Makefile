# `make demo` and `make test` each set up .venv (pinned deps) on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ilias-ray demo --workdir demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The quick tier for fast edits (under 2 minutes): the math, config, plan, rows, sink, parts and
# output modules, the packaging pins, and one small end-to-end run on a real local Ray cluster.
CHECK_TESTS := tests/test_config.py tests/test_plan.py tests/test_preprocess.py tests/test_embed.py \
	tests/test_rows.py tests/test_sink.py tests/test_parts.py tests/test_hdf5_out.py tests/test_read.py \
	tests/test_packaging.py "tests/test_extract.py::test_text_queries"
check: $(STAMP)
	$(BIN)/python -m pytest -q $(CHECK_TESTS)

# Lint and format check (ruff, settings in pyproject.toml); .ci/run runs it before the suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf demo_output .pytest_cache

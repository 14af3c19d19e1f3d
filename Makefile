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

# The quick tier for fast edits (under 60 s): the unit tests of every layer below the job (errors,
# config, plan types, storage, output, plan, the stages), the job's sizing and arguments, the flags,
# the repository's own checks (layers, pins, cloud files), and one small run on a real local Ray
# cluster (the text queries). `make test` runs everything, e2e/ included.
CHECK_TESTS := tests/test_errors.py tests/test_config.py tests/test_plan_types.py tests/storage tests/plan \
	tests/output/test_schema.py tests/output/test_parts.py tests/output/test_assemble.py \
	tests/stages/test_rows.py tests/stages/test_blocks.py tests/stages/test_sink.py tests/stages/test_decode.py \
	tests/stages/test_embed.py tests/job/test_sizing.py tests/job/test_stage_args.py tests/job/test_progress.py \
	tests/cli/test_flags.py tests/cli/test_sweep.py tests/project "tests/job/test_run.py::test_text_queries"

check: $(STAMP)
	$(BIN)/python -m pytest -q $(CHECK_TESTS)

# Lint and format check (ruff, settings in pyproject.toml); .ci/run runs it before the suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf demo_output .pytest_cache

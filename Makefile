PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The optional TPU runtime lives in its own venv, so `make test` stays light (requirements-tpu.txt).
TPU_VENV := .venv-tpu
TPU_PY := $(TPU_VENV)/bin/python
TPU_STAMP := $(TPU_VENV)/.installed

.PHONY: test test-golden test-tpu install demo clean

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=25 tests

# The whole system end to end on a 2-core CPU, about 20 min: outputs/demo/report.md (python -m nextstep_jax.demo --help).
demo: $(STAMP)
	$(PY) -m nextstep_jax.demo --out outputs/demo

# The tests that read golden vectors, against another golden folder: make test-golden GOLDEN=/path/to/set
# (GOLDEN_MARK='golden and not slow' leaves out the multi-device programs, the longest of them).
GOLDEN_MARK ?= golden
test-golden: $(STAMP)
	test -d "$(GOLDEN)/cases" || { echo "GOLDEN=$(GOLDEN): not a golden folder (no cases/)"; exit 2; }
	NEXTSTEP_GOLDEN_DIR="$(abspath $(GOLDEN))" $(PY) -m pytest -q -n 2 -m "$(GOLDEN_MARK)" --durations=25 tests

$(TPU_STAMP): requirements.txt requirements-test.txt requirements-tpu.txt pyproject.toml
	test -x $(TPU_PY) || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_PY) -m pip install -q --upgrade pip
	$(TPU_PY) -m pip install -q -r requirements-tpu.txt -r requirements-test.txt
	$(TPU_PY) -m pip install -q --no-deps -e .
	touch $(TPU_STAMP)

# TPU programs compiled ahead of time on this host (no TPU needed): tests/tpu; the pod launcher's libtpu flags.
test-tpu: $(TPU_STAMP)
	NEXTSTEP_REQUIRE_TPU=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 $(TPU_PY) -m pytest -q tests/tpu tests/launch

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache

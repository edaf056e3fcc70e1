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

import pytest

import vllm_loglik

from .conftest import MAX_MODEL_LEN

from .lm_eval_runs import (
    assert_metrics,
    assert_same,
    greedy,
    lm_eval,
    loglikelihoods,
    side_by_side,
)

@pytest.fixture(scope="module")
def hf_mc(hf_bos):
    """lm-eval's `hf` backend on the multiple-choice task, with `add_bos_token=True`: the
    server encodes a prompt as vLLM does, with the tokenizer's BOS (`conftest.hf_bos`)."""
    return hf_bos


@pytest.fixture(scope="module")
def runs(server, model_path, tmp_path_factory):
    """Both tasks in one run of `vllm-loglik` against the server, and beside it (each run is
    mostly start-up) lm-eval's `hf` backend on the rolling task: no BOS added to the text (the
    first window starts after the prefix token, as the server's do), and windows of the
    server's length (`max_model_len - 2`)."""
    ours = ["--model", "vllm-loglik", "--model_args",
            f"base_url={server.url}/v1/completions,model=tiny,num_concurrent=4,max_retries=1",
            "--tasks", "loglik_mc,loglik_rolling"]  # fmt: skip
    hf = ["--model", "hf", "--model_args",
          f"pretrained={model_path},dtype=float32,add_bos_token=False,"
          f"max_length={MAX_MODEL_LEN - 2}",
          "--tasks", "loglik_rolling", "--batch_size", "1"]  # fmt: skip
    ours_out, hf_out = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("hf-rolling")
    return side_by_side(lambda: lm_eval(ours, ours_out), lambda: lm_eval(hf, hf_out))


@pytest.fixture(scope="module")
def ours(runs):
    return runs[0]


@pytest.fixture(scope="module")
def hf_rolling(runs):
    return runs[1]


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
    ours = ["--model", "vllm-loglik-chat", "--model_args",
            f"base_url={server.url}/v1/chat/completions,model=tiny,num_concurrent=4,max_retries=1",
            *chat]  # fmt: skip
    hf = ["--model", "hf", "--model_args", f"pretrained={model_path},dtype=float32",
          "--batch_size", "4", *chat]  # fmt: skip
    (results, samples), (ref_results, ref_samples) = side_by_side(
        lambda: lm_eval(ours, tmp_path / "ours"), lambda: lm_eval(hf, tmp_path / "hf")
    )
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

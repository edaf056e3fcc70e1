"""The target-only prompt-logprob path (`vllm_loglik.target_logprobs`) against vLLM's own path,
on the same engine.

The session's engines compute the prompt logprobs of vllm-loglik's requests target-only; a
request without the mark (anyone else's: here `LLM.generate` with `prompt_logprobs`, as vLLM's
users call it) takes vLLM's own path in the same engine, in the same step. Each engine appends
the id of every request that took the target-only path to a trace file (`conftest.TRACE`), which
shows which path ran. Ranks must be equal, logprobs within 1e-5, in float32 and in bfloat16.

From vLLM 0.34 on there is no V1 and no target-only path (V2's own is already target-only
enough, `vllm_loglik.runners`): there, the V1 tests skip, and the one patch on V2, the word
masses of `vllm_loglik.v2_scoring`, is checked to leave everyone else's token-id scores alone.
"""

from __future__ import annotations

import pytest

import vllm_loglik
from vllm_loglik.offline import scorer_for
from vllm_loglik.target_logprobs import MARK

from .conftest import HAS_V1, MAX_MODEL_LEN, TRACE, default_processes
from .test_server import LONG_CONTEXT, MODEL, OPTIONS, metric, post

#: The tests of V1's target-only patch (vLLM 0.32/0.33; gone with V1 from 0.34 on).
v1_only = pytest.mark.skipif(not HAS_V1, reason="V1's target-only patch: vLLM 0.34 has no V1")

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris, I think."}]  # fmt: skip


def jobs(llm):
    """One job of every mode, on the engine's tokenizer."""
    scorer = scorer_for(llm)
    return [
        scorer.prompt("Every token of this prompt but the first is scored: Ωμέγα 🙂."),
        scorer.pair("The capital of France is", " Paris"),
        scorer.pair(LONG_CONTEXT, OPTIONS[0]),
        scorer.rolling(" ".join(["A rolling text, in several windows."] * 20)),
        scorer.chat(CHAT),
    ]


def native(llm, spans, k: int, marked: bool = False):
    """vLLM's own prompt logprobs of each span's prompt (the target-only path when `marked`)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, extra_args={MARK: True} if marked else None)
    prompts = [TokensPrompt(prompt_token_ids=s.prompt_token_ids) for s in spans]
    return llm.generate(prompts, params, use_tqdm=False)


def assert_close(ours, theirs, spans, k: int, tol: float = 1e-5) -> None:
    """The rows of the scored positions: the same ranks, logprobs within `tol`, the same top k
    (ids where their logprobs differ by more than `tol`)."""
    for span, a, b in zip(spans, ours, theirs, strict=True):
        for p in range(span.start, len(span.prompt_token_ids)):
            row_a, row_b = a.prompt_logprobs[p], b.prompt_logprobs[p]
            t = span.prompt_token_ids[p]
            assert row_a[t].rank == row_b[t].rank, (p, row_a[t], row_b[t])
            assert row_a[t].logprob == pytest.approx(row_b[t].logprob, abs=tol)
            top_a = sorted((lp.rank, lp.logprob) for i, lp in row_a.items() if i != t or lp.rank <= k)
            top_b = sorted((lp.rank, lp.logprob) for i, lp in row_b.items() if i != t or lp.rank <= k)
            assert [r for r, _ in top_a] == [r for r, _ in top_b]
            assert [lp for _, lp in top_a] == pytest.approx([lp for _, lp in top_b], abs=tol)


def traced() -> set[str]:
    return set(TRACE.read_text().split()) if TRACE.exists() else set()


@v1_only
@pytest.mark.parametrize("k", [0, 5])
def test_target_only_path_equals_vllms_own_path_float32(llm, k):
    spans = [s for job in jobs(llm) for s in job.spans]
    before = traced()
    ours = native(llm, spans, k, marked=True)
    assert len(traced() - before) == len(spans)  # every marked request took the target-only path
    theirs = native(llm, spans, k)
    assert len(traced() - before) == len(spans)  # and no unmarked one
    assert_close(ours, theirs, spans, k)


@v1_only
def test_other_clients_are_served_by_vllms_path_alongside(llm):
    """Marked and unmarked requests in one `generate` call, so in the same engine steps: the
    unmarked ones are byte for byte what vLLM gives them alone."""
    from vllm import SamplingParams, TokensPrompt

    spans = [s for job in jobs(llm) for s in job.spans]
    alone = native(llm, spans, 2)
    prompts = [TokensPrompt(prompt_token_ids=s.prompt_token_ids) for s in spans]
    mine = SamplingParams(max_tokens=1, prompt_logprobs=2, extra_args={MARK: True})
    theirs = SamplingParams(max_tokens=1, prompt_logprobs=2)
    before = traced()
    mixed = llm.generate(prompts * 2, [mine] * len(spans) + [theirs] * len(spans), use_tqdm=False)
    assert len(traced() - before) == len(spans)
    for a, b in zip(mixed[len(spans):], alone, strict=True):
        assert [dict(r) if r else r for r in a.prompt_logprobs] == [dict(r) if r else r for r in b.prompt_logprobs]
    assert_close(mixed[: len(spans)], alone, spans, 2)


@v1_only
def test_scores_through_the_api_take_the_target_only_path(llm, ref):
    before = traced()
    scores = vllm_loglik.loglikelihood(llm, [("The capital of France is", " Paris")], top_logprobs=5)
    assert len(traced() - before) == 1
    ids = scorer_for(llm).pair("The capital of France is", " Paris").spans[0]
    want, greedy = ref.score(ids.prompt_token_ids, ids.start)
    assert [t.logprob for t in scores[0].tokens] == pytest.approx(want, abs=1e-4)
    assert all(len(t.top_logprobs) == 5 for t in scores[0].tokens)


@pytest.fixture(scope="module")
def bf16_llm(model_path):
    from vllm import LLM

    with default_processes():
        engine = LLM(model_path, dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
                     enforce_eager=True, seed=0, block_size=32)  # fmt: skip
    yield engine
    engine.llm_engine.engine_core.shutdown()


@v1_only
@pytest.mark.parametrize("k", [0, 5])
def test_target_only_path_equals_vllms_own_path_bfloat16(bf16_llm, k):
    spans = [s for job in jobs(bf16_llm) for s in job.spans]
    assert_close(native(bf16_llm, spans, k, marked=True), native(bf16_llm, spans, k), spans, k)


@v1_only
def test_fallback_is_vllms_path_and_counted(v2_server, llm):
    """`VLLM_LOGLIK_TARGET_LOGPROBS=0` on the V2-layout server (as a GPU's V2 runner, where the
    path does not apply): every scoring request is computed by vLLM's own path (its engine
    traces none), counted on `fallbacks_total{reason="prompt_logprobs_path"}`, with the same
    numbers."""
    reason = "prompt_logprobs_path"
    before = metric(v2_server, "vllm_loglik:fallbacks_total", reason=reason)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 0,
            "loglikelihood": {"continuations": [" Paris", " Rome"]}}  # fmt: skip
    response = post(v2_server, "/v1/completions", body, key=None)
    assert response.status_code == 200, response.text
    assert metric(v2_server, "vllm_loglik:fallbacks_total", reason=reason) - before == 2
    assert not v2_server.trace.exists() or v2_server.trace.read_text() == ""
    offline = vllm_loglik.loglikelihood(llm, [("The capital of France is", c) for c in (" Paris", " Rome")])
    for entry, score in zip(response.json()["choices"][0]["loglikelihood"], offline, strict=True):
        assert entry["logprob"] == pytest.approx(score.logprob, abs=1e-4)


def test_main_server_takes_the_path_and_counts_no_fallback(server):
    reason = "prompt_logprobs_path"
    before_trace, before = traced(), metric(server, "vllm_loglik:fallbacks_total", reason=reason)
    r = server.client().completions.create(model=MODEL, prompt="Hello there, world.", max_tokens=0,
                                           extra_body={"loglikelihood": True})  # fmt: skip
    assert r.choices[0].model_extra["loglikelihood"][0]["num_tokens"] > 0
    assert len(traced() - before_trace) == (1 if HAS_V1 else 0)
    assert metric(server, "vllm_loglik:fallbacks_total", reason=reason) == before == 0


@pytest.mark.skipif(HAS_V1, reason="V2's word-mass patch (vLLM 0.34 on)")
def test_v2_word_masses_leave_other_token_id_scores_alone(llm, ref):
    """A marked words request and an unmarked `prompt_logprob_token_ids` request in one call,
    so in the same engine steps: the unmarked one gets transformers' logprobs of its ids, the
    marked one finite masses in both columns."""
    import math

    import numpy as np
    from vllm import SamplingParams, TokensPrompt

    from vllm_loglik.runners import runner_of

    span = scorer_for(llm).pair(LONG_CONTEXT, OPTIONS[0]).spans[0]
    ids, start = span.prompt_token_ids, span.start
    rows = len(ids) - start
    theirs = SamplingParams(max_tokens=1, prompt_logprob_start=start - 1, detokenize=False,
                            prompt_logprob_token_ids=np.array([[t, 5] for t in ids[start:]]))  # fmt: skip
    mine = runner_of(llm.llm_engine.vllm_config).scoring_params(len(ids), start, 0, False, True)
    prompt = TokensPrompt(prompt_token_ids=ids)
    a, b = llm.generate([prompt, prompt], [theirs, mine], use_tqdm=False)
    want, _ = ref.token_logprobs(ids)
    assert a.prompt_token_id_logprobs.shape == (rows, 2)
    assert a.prompt_token_id_logprobs[:, 0].tolist() == pytest.approx(want[start - 1 :], abs=1e-4)
    assert b.prompt_token_id_logprobs.shape == (rows, 2)
    assert all(math.isfinite(v) and v < 0 for v in b.prompt_token_id_logprobs.ravel().tolist())
    # Column 1 of a row is column 0 of the next: the same distribution's mass.
    assert b.prompt_token_id_logprobs[1:, 0].tolist() == pytest.approx(
        b.prompt_token_id_logprobs[:-1, 1].tolist(), abs=1e-5
    )

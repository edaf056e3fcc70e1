"""The server on vLLM 0.32/0.33's GPU model runner (V2) layout of prompt logprobs, simulated on
the CPU.

vLLM 0.34's V2 runs for real in `make test-vllm-next` (its standalone CPU runner), and there a
scored span sets `prompt_logprob_start`, whose rows come back one per prompt position. A GPU
server on vLLM 0.32 or 0.33 runs a V2 without that field for `prompt_logprobs`, which returns the prompt logprobs of a request that read the
prefix cache as `[None]` plus the computed rows only; the CPU build runs V1 (see
`vllm_loglik.engine_output`). This server has `tests/v2_layout/sitecustomize.py` on its
`PYTHONPATH`, which rewrites every V1 output into V2's layout before the plugin reads it. The
shared-context path must give the uncached numbers from the cached rows, without scoring again.
"""

from __future__ import annotations

import concurrent.futures

import httpx

import vllm_loglik
from tests.test_server import (
    LONG_CONTEXT,
    MODEL,
    OPTIONS,
    assert_same,
    metric,
    metric_total,
    post,
    prefix_cache_hits,
)
from vllm_loglik.engine_output import UNREADABLE_REASONS
from vllm_loglik.protocol import LoglikelihoodEntry, entries

def finished_requests(server) -> float:
    return metric_total(server, "vllm:request_success_total")


def rewrites(server) -> list[tuple[str, int, int, int]]:
    """(request id, V1 length, cached tokens, V2 length) of each output the hook rewrote."""
    rows = []
    for line in server.rewrites.read_text().splitlines():
        rid, v1, cached, v2 = line.split()
        rows.append((rid, int(v1), int(cached), int(v2)))
    return rows


def test_shared_context_reads_v2_layout_without_rescoring(v2_server, llm):
    offline = vllm_loglik.loglikelihood(llm, [(LONG_CONTEXT, o) for o in OPTIONS], top_logprobs=2)
    before_requests, before_hits = finished_requests(v2_server), prefix_cache_hits(v2_server)
    before_rows = len(rewrites(v2_server))
    response = v2_server.client().completions.create(
        model=MODEL, prompt=LONG_CONTEXT, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": OPTIONS, "top_logprobs": 2}},
    )  # fmt: skip
    for entry, score in zip(entries(response.choices[0]), offline, strict=True):
        assert_same(entry, score)
    # The outputs were in V2's layout: shorter than the prompt by the cached tokens.
    rows = rewrites(v2_server)[before_rows:]
    assert len(rows) == len(OPTIONS)
    assert all(v2 == v1 - cached and cached >= 64 for _, v1, cached, v2 in rows)
    # Each continuation read the context from the cache, and none was scored again:
    # one warm-up request plus one request per continuation.
    assert prefix_cache_hits(v2_server) - before_hits >= len(OPTIONS) * 64
    assert finished_requests(v2_server) - before_requests == 1 + len(OPTIONS)


def test_chat_and_concurrent_requests_on_v2_layout(v2_server, llm):
    chat = [{"role": "user", "content": LONG_CONTEXT}]
    [offline_chat] = vllm_loglik.chat_loglikelihood(llm, [chat], candidates=[OPTIONS])
    response = v2_server.client().chat.completions.create(
        model=MODEL, messages=chat, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": OPTIONS}},
    )  # fmt: skip
    for entry, score in zip(entries(response.choices[0]), offline_chat, strict=True):
        assert_same(entry, score)

    contexts = [LONG_CONTEXT, LONG_CONTEXT.replace("building", "place"), LONG_CONTEXT + " Hmm."]
    expected = {
        c: vllm_loglik.loglikelihood(llm, [(c, o) for o in OPTIONS]) for c in contexts
    }

    def ask(context: str) -> httpx.Response:
        body = {"model": MODEL, "prompt": context, "max_tokens": 0,
                "loglikelihood": {"continuations": OPTIONS}}  # fmt: skip
        return post(v2_server, "/v1/completions", body, key=None)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, contexts * 2))
    for context, response in zip(contexts * 2, results, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()["choices"][0]["loglikelihood"]
        for entry, score in zip(got, expected[context], strict=True):
            assert_same(LoglikelihoodEntry.model_validate(entry), score)
    assert v2_server.alive()


BREAK_CACHED = [1000, 1001, 1002, 1003]  # see tests/v2_layout/sitecustomize.py
BREAK_ALL = [1003, 1002, 1001, 1000]


def test_unreadable_cached_output_is_scored_again(v2_server, ref):
    bos = ref.tokenizer.bos_token_id
    ctx = [bos] + BREAK_CACHED + ref.tokenizer.encode(LONG_CONTEXT, add_special_tokens=False)
    body = {"model": MODEL, "prompt": ctx, "max_tokens": 0,
            "loglikelihood": {"continuations": OPTIONS}}  # fmt: skip
    before = finished_requests(v2_server)
    fallbacks = {r: metric(v2_server, "vllm_loglik:fallbacks_total", reason=r)
                 for r in UNREADABLE_REASONS}  # fmt: skip
    response = post(v2_server, "/v1/completions", body, key=None)
    assert response.status_code == 200, response.text
    # The metric counts each span scored again, with the reason: a length of neither layout.
    for reason, count in fallbacks.items():
        grown = metric(v2_server, "vllm_loglik:fallbacks_total", reason=reason) - count
        assert grown == (len(OPTIONS) if reason == "layout" else 0), reason
    for entry, option in zip(response.json()["choices"][0]["loglikelihood"], OPTIONS, strict=True):
        cont = ref.tokenizer.encode(option, add_special_tokens=False)
        want, _ = ref.score(ctx + cont, len(ctx))
        assert [t["token_id"] for t in entry["content"]] == cont
        for got, lp in zip(entry["content"], want, strict=True):
            assert abs(got["logprob"] - lp) <= 1e-4
    # The warm-up, a cached attempt per continuation, and the same again without the cache.
    assert finished_requests(v2_server) - before == 1 + 2 * len(OPTIONS)


def test_unreadable_output_is_a_500_with_an_error_id_never_a_400(v2_server):
    prompt = [1] + BREAK_ALL + [5, 6, 7]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 0, "loglikelihood": True}
    labels = {"endpoint": "completions", "mode": "prompt", "model": MODEL, "outcome": "5xx"}
    failed = metric(v2_server, "vllm_loglik:requests_total", **labels)
    response = post(v2_server, "/v1/completions", body, key=None)
    assert response.status_code == 500, response.text
    assert metric(v2_server, "vllm_loglik:requests_total", **labels) == failed + 1
    error = response.json()["error"]
    assert error["type"] == "InternalServerError" and error["code"] == 500
    assert error["param"] is None
    assert "error id loglik-error-" in error["message"]
    assert "Traceback" not in response.text and "positions" not in response.text
    error_id = error["message"].split("error id ")[1].split(")")[0]
    log = v2_server.log_path.read_text()
    assert error_id in log and "EngineOutputError" in log
    # Nothing else is affected: the server lives, and the next request is served.
    good = dict(body, prompt=[1, 5, 6, 7])
    response = post(v2_server, "/v1/completions", good, key=None)
    assert response.status_code == 200
    assert response.json()["choices"][0]["loglikelihood"][0]["num_tokens"] == 3


def test_a_client_leaving_during_the_retry_without_the_cache_aborts_it(v2_server):
    """900 contexts whose cached outputs cannot be read: the warm-up, the cached attempts, and
    then the retry of every continuation without the cache. The client leaves once the retry
    is under way; the engine is idle soon after, and most of the retry is never computed."""
    import asyncio
    import time

    from tests.test_hostile import gauges, wait_idle

    contexts = [[1, *BREAK_CACHED] + [10 + (7 * i + 13 * j) % 900 for j in range(100)]
                for i in range(900)]  # fmt: skip
    continuations = [" a", " b", " c"]
    body = {"model": MODEL, "prompt": contexts, "max_tokens": 0,
            "loglikelihood": {"continuations": continuations, "content": False}}  # fmt: skip
    warm_up = 900 * 105  # computed once per context
    retry = 900 * len(continuations) * 107  # the whole of each pair, again
    start = gauges(v2_server)[2]

    async def leave_during_the_retry() -> float:
        async with httpx.AsyncClient(base_url=v2_server.url, timeout=300) as client:
            request = asyncio.create_task(client.post("/v1/completions", json=body))
            while True:
                await asyncio.sleep(0.05)
                assert not request.done(), "the request ended before the retry was under way"
                computed = gauges(v2_server)[2] - start
                if computed > warm_up + 45_000:  # past the warm-up and the cached attempts (~30k)
                    break
            request.cancel()
            return computed

    left_at = asyncio.run(leave_during_the_retry())
    wait_idle(v2_server, within=10)
    time.sleep(1)
    done = gauges(v2_server)[2] - start
    assert done < warm_up + 0.6 * retry, (left_at, done, warm_up + retry)
    # The next request is served, and correct.
    good = {"model": MODEL, "prompt": [1, 5, 6, 7], "max_tokens": 0, "loglikelihood": True}
    response = post(v2_server, "/v1/completions", good, key=None)
    assert response.status_code == 200
    print(f"\nretry: left at {left_at:,.0f} computed tokens; {done:,.0f} of "
          f"{warm_up + retry:,} computed in all")


def test_words_on_v2_plain_sums_and_corrected_refused(v2_server, llm):
    """Where the target-only path does not run (here: turned off, as on a GPU's V2 runner),
    word scores as plain sums are read from vLLM's own prompt logprobs in V2's layout, and
    `corrected` is a 400 that says why and what to do, never an uncorrected number."""
    context, conts = LONG_CONTEXT, [" Paris is nice", " a city, and a river."]
    body = {"model": MODEL, "prompt": context, "max_tokens": 0,
            "loglikelihood": {"continuations": conts, "words": True, "word_probability": "tokens"}}
    response = post(v2_server, "/v1/completions", body, key=None)
    assert response.status_code == 200, response.text
    got = [LoglikelihoodEntry.model_validate(e) for e in response.json()["choices"][0]["loglikelihood"]]
    offline = vllm_loglik.loglikelihood(
        llm, [(context, c) for c in conts], words=True, word_probability="tokens"
    )
    for entry, score in zip(got, offline, strict=True):
        assert [(w.text, w.num_tokens) for w in entry.words] == [(w.text, w.num_tokens) for w in score.words]
        for w, s in zip(entry.words, score.words, strict=True):
            assert abs(w.tokens_logprob - s.tokens_logprob) < 1e-4 and w.logprob == w.tokens_logprob
    body["loglikelihood"]["word_probability"] = "corrected"
    refused = post(v2_server, "/v1/completions", body, key=None)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "loglikelihood.word_probability"
    # No message sends anyone to V1 (vLLM 0.34 has none): it names the switch and 'tokens'.
    assert "VLLM_USE_V2_MODEL_RUNNER" not in error["message"] and "'tokens'" in error["message"]
    assert "turned off" in error["message"]
    assert v2_server.alive()

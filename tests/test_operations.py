"""What an operator sees: the plugin's metrics on vLLM's `/metrics`, and a front-end of two
API-server processes (`vllm serve --api-server-count 2`).

The counters are read from real servers after real requests: a multiple-choice request warms
its context up once and reads it from the prefix cache, a whole prompt does neither, a 400 is
counted as 4xx. The two-process server gets concurrent requests of every mode, each compared
with the offline API; its log shows that both processes served them, and `/metrics` (from
either process) counts all of them.
"""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx

import pytest

import vllm_loglik

from .conftest import API_KEY, Server
from .test_hostile import wait_idle
from .test_lora import SERVER_REQUESTS, offline_scores, server_entries
from .test_server import LONG_CONTEXT, MODEL, OPTIONS, assert_same, metric, post


def counts(server, model: str = MODEL) -> dict[str, float]:
    return {
        name: metric(server, f"vllm_loglik:{name}_total", model=model)
        for name in ("scored_tokens", "prompt_tokens", "warmups", "warmup_tokens", "cached_tokens")
    }


def test_counters_move_as_the_requests_say(server, llm, ref):
    requests = {"endpoint": "completions", "model": MODEL}
    before, ok = counts(server), metric(server, "vllm_loglik:requests_total", **requests,
                                        mode="continuations", outcome="200")  # fmt: skip
    latency = metric(server, "vllm_loglik:request_duration_seconds_count", endpoint="completions")
    body = {"model": MODEL, "prompt": LONG_CONTEXT, "max_tokens": 0,
            "loglikelihood": {"continuations": OPTIONS}}  # fmt: skip
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200
    after = counts(server)
    scored = sum(e["num_tokens"] for e in response.json()["choices"][0]["loglikelihood"])
    context = len(ref.tokenizer.encode(LONG_CONTEXT))
    assert after["scored_tokens"] - before["scored_tokens"] == scored
    assert after["prompt_tokens"] - before["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
    # One warm-up of the shared context (less its last token), read by every continuation in
    # whole KV blocks of 32.
    assert after["warmups"] - before["warmups"] == 1
    assert after["warmup_tokens"] - before["warmup_tokens"] == context - 1
    assert after["cached_tokens"] - before["cached_tokens"] == len(OPTIONS) * ((context - 1) // 32 * 32)
    assert metric(server, "vllm_loglik:requests_total", **requests, mode="continuations",
                  outcome="200") == ok + 1  # fmt: skip

    # A whole prompt: no warm-up, nothing read from the cache.
    before = counts(server)
    body = {"model": MODEL, "prompt": "A whole prompt, scored once.", "max_tokens": 0,
            "loglikelihood": True}  # fmt: skip
    assert post(server, "/v1/completions", body).status_code == 200
    after = counts(server)
    assert after["warmups"] == before["warmups"] and after["cached_tokens"] == before["cached_tokens"]
    assert after["scored_tokens"] > before["scored_tokens"]

    # A 400 (an empty continuation) is a 4xx, and costs the engine nothing.
    bad = metric(server, "vllm_loglik:requests_total", **requests, outcome="4xx")
    body = {"model": MODEL, "prompt": "a", "max_tokens": 0, "loglikelihood": {"continuations": [""]}}
    assert post(server, "/v1/completions", body).status_code == 400
    assert metric(server, "vllm_loglik:requests_total", **requests, outcome="4xx") == bad + 1
    assert counts(server)["prompt_tokens"] == after["prompt_tokens"]
    # Every request is in the latency histogram; the fallbacks are exported, at 0.
    assert metric(server, "vllm_loglik:request_duration_seconds_count",
                  endpoint="completions") == latency + 3  # fmt: skip
    text = httpx.get(server.url + "/metrics").text
    for reason in ("layout", "missing_entry", "wrong_token"):  # never, on a readable layout
        assert f'vllm_loglik:fallbacks_total{{reason="{reason}"}} 0.0' in text


def test_a_client_that_leaves_is_counted_as_cancelled(server, llm):
    """A client that times out on a long request: its engine work is aborted, and the request
    is counted, as `cancelled`, in the requests and in the latency histogram (on vLLM 0.32,
    whose `with_cancellation` returns None for it, and on 0.33, which returns `Response()`)."""
    labels = {"endpoint": "completions", "mode": "rolling"}
    cancelled = metric(server, "vllm_loglik:requests_total", **labels, outcome="cancelled")
    latency = metric(server, "vllm_loglik:request_duration_seconds_count", **labels)
    body = {"model": MODEL, "max_tokens": 0, "prompt": "word " * 120_000,  # about 6 s in full
            "loglikelihood": {"scope": "rolling", "content": False}}  # fmt: skip
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(60, read=1.0))  # fmt: skip
    wait_idle(server, within=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(server, "vllm_loglik:requests_total", **labels, outcome="cancelled") > cancelled:
            break
        time.sleep(0.1)
    assert metric(server, "vllm_loglik:requests_total", **labels, outcome="cancelled") == cancelled + 1
    assert metric(server, "vllm_loglik:request_duration_seconds_count", **labels) == latency + 1
    # The next request is answered, with the offline API's numbers.
    text = "After a client left."
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 0,
                                                "loglikelihood": True})  # fmt: skip
    assert response.status_code == 200
    [offline] = vllm_loglik.prompt_loglikelihood(llm, [text])
    assert response.json()["choices"][0]["loglikelihood"][0]["logprob"] == pytest.approx(
        offline.logprob, abs=1e-4 * offline.num_tokens
    )


def test_an_empty_last_message_is_a_400_naming_its_content(server):
    for messages in ([{"role": "user"}], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]):
        body = {"model": MODEL, "messages": messages, "max_tokens": 0,
                "loglikelihood": {"scope": "last_message"}}  # fmt: skip
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 400, response.text
        field = f"messages[{len(messages) - 1}].content"
        assert response.json()["error"]["param"] == field
        assert field in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def two_front_ends(model_path, tmp_path_factory):
    """`vllm serve --api-server-count 2` with the plugin (through `vllm-loglik serve`, which
    starts `vllm serve` on the CPU build too), logging each request with its process."""
    log = tmp_path_factory.mktemp("two-logs") / "server.log"
    srv = Server(model_path, log, True, API_KEY, vllm_serve=True,
                 extra_args=["--api-server-count", "2", "--enable-log-requests"])  # fmt: skip
    yield srv
    srv.stop()


def test_two_api_server_processes_serve_and_count_every_request(two_front_ends, llm):
    expected, _ = offline_scores(llm, None)
    rounds = 6

    def one_round(_: int) -> list:
        return server_entries(two_front_ends, MODEL)

    with concurrent.futures.ThreadPoolExecutor(rounds) as pool:
        results = list(pool.map(one_round, range(rounds)))
    for got in results:
        assert len(got) == len(expected)
        for entry, score in zip(got, expected, strict=True):
            assert_same(entry, score)
    # Every scoring request is counted, by the metrics of both processes together.
    sent = SERVER_REQUESTS * rounds
    assert metric(two_front_ends, "vllm_loglik:requests_total", outcome="200") == sent
    assert metric(two_front_ends, "vllm_loglik:request_duration_seconds_count") == sent
    assert metric(two_front_ends, "vllm_loglik:warmups_total") >= rounds
    # Both processes received scoring requests: each logs the engine requests it adds.
    log = two_front_ends.log_path.read_text()
    served = set(re.findall(r"\((ApiServer_\d) pid=\d+\)[^\n]*Added request loglik-", log))
    assert served == {"ApiServer_0", "ApiServer_1"}, served
    # The same request gets the same answer from whichever process takes it.
    answers = {
        tuple(e["logprob"] for e in post(two_front_ends, "/v1/completions", {
            "model": MODEL, "prompt": LONG_CONTEXT, "max_tokens": 0,
            "loglikelihood": {"continuations": OPTIONS}}).json()["choices"][0]["loglikelihood"])
        for _ in range(8)
    }  # fmt: skip
    offline = vllm_loglik.loglikelihood(llm, [(LONG_CONTEXT, o) for o in OPTIONS])
    for answer in answers:
        assert answer == pytest.approx([s.logprob for s in offline], abs=1e-4)

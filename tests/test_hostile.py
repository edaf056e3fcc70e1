"""Hostile input, caps, disconnects and fetches: a server that anyone may reach stays correct.

A server with low caps (set by their environment variables) receives request bodies generated
from its own OpenAPI document (schemathesis) and from hypothesis strategies for the
`loglikelihood` object and the prompts and messages around it: wrong types, huge numbers, deep
nesting, long strings, lone surrogates, invalid UTF-8, token ids out of range, empty and enormous
lists. No answer may be a 500; every error is in the OpenAI shape and quotes at most a short
excerpt of the input; the engine stays up and a good request afterwards is still correct.

`make test` tries `EXAMPLES` bodies per strategy; `make soak` (VLLM_LOGLIK_SOAK=1) many more.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vllm_loglik

from .conftest import API_KEY, SOAK, Server

EXAMPLES = 600 if SOAK else 80
MODEL = "tiny"
LIMITS = {
    "VLLM_LOGLIK_MAX_BODY_BYTES": 2_000_000,
    "VLLM_LOGLIK_MAX_CONTINUATIONS": 16,
    "VLLM_LOGLIK_MAX_SCORED_TOKENS": 400_000,
    "VLLM_LOGLIK_MAX_ROLLING_WINDOWS": 3500,
    "VLLM_LOGLIK_MAX_TOP_LOGPROBS": 5,
    "VLLM_LOGLIK_MAX_N": 4,
}
LONG = "x" * 20_000
LONE = "\ud800"  # a lone surrogate: json.dumps sends it as the escape \ud800
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip


@pytest.fixture(scope="module")
def guarded(model_path, tmp_path_factory):
    """The demo model behind a server with low caps."""
    env = {k: str(v) for k, v in LIMITS.items()}
    srv = Server(model_path, tmp_path_factory.mktemp("logs") / "guarded.log", True, API_KEY, env)
    yield srv
    srv.stop()


def send(
    server, path: str, body: object = None, raw: bytes | None = None, timeout: object = 120
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body)  # escapes lone surrogates
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=timeout)


def assert_answered(response: httpx.Response) -> None:
    """Not a 500; an error is in the OpenAI shape and quotes no long run of the input."""
    assert response.status_code < 500, response.text[:2000]
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code"}, error
        assert error["code"] == response.status_code
        assert "Traceback" not in response.text
        # A short excerpt at most: this plugin quotes 48 characters of an input; vLLM's
        # validation handler (which answers for the request model) 200 characters of each of
        # at most 10 errors.
        assert "x" * 250 not in response.text, response.text[:300]
        assert len(error["message"]) <= 4000, error["message"][:300]


def assert_still_correct(server, llm) -> None:
    """The engine is up and a good request gets the offline API's numbers."""
    assert httpx.get(server.url + "/health").status_code == 200
    body = {"model": MODEL, "prompt": "Question: red or blue? Answer:", "max_tokens": 0,
            "loglikelihood": {"continuations": [" red", " blue"]}}  # fmt: skip
    response = send(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    want = vllm_loglik.loglikelihood(llm, [(body["prompt"], c) for c in (" red", " blue")])
    for entry, score in zip(response.json()["choices"][0]["loglikelihood"], want, strict=True):
        assert abs(entry["logprob"] - score.logprob) <= 1e-4 * score.num_tokens


# ---------------------------------------------------------------- strategies

leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
    st.sampled_from([LONE, LONE + "a", LONG, "", "🙂", "\x00", "\ufeff"]),
)  # fmt: skip
json_value = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)  # fmt: skip
text = st.one_of(st.text(max_size=120), st.sampled_from([LONE, "a" + LONE, LONG, "", " ", "é 🙂 中文"]))
token_ids = st.lists(st.integers(-3, 2**40), min_size=0, max_size=40)
options = st.fixed_dictionaries(
    {},
    optional={
        "continuations": st.one_of(st.lists(text, max_size=20), json_value, st.just(["a"] * 5000)),
        "scope": st.one_of(st.sampled_from(["prompt", "last_message", "rolling", "bogus"]), json_value),
        "top_logprobs": st.one_of(st.integers(-5, 2**64), json_value),
        "content": st.one_of(st.booleans(), json_value),
        LONG: json_value,
    },
)  # fmt: skip
field = st.one_of(st.just(True), options, options, json_value)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "http://127.0.0.1:9/x.png"})}),
    json_value,
)  # fmt: skip
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "bogus"]),
     "content": st.one_of(text, st.lists(part, max_size=3), json_value)},
)  # fmt: skip
extras = st.fixed_dictionaries(
    {"model": st.just(MODEL)},
    optional={"max_tokens": st.sampled_from([0, 0, 0, 2, -1]), "n": st.integers(-1, 10**6),
              "logprobs": st.one_of(st.integers(-1, 100), st.booleans()),
              "top_logprobs": st.integers(-1, 100), "stream": st.booleans(), "echo": st.booleans()},
)  # fmt: skip
completion_body = st.builds(
    lambda extra, prompt, ll: {**extra, "prompt": prompt, "loglikelihood": ll},
    extras, st.one_of(text, token_ids, st.lists(st.one_of(text, token_ids), max_size=4), json_value), field,
)  # fmt: skip
chat_body = st.builds(
    lambda extra, messages, ll: {**extra, "messages": messages, "loglikelihood": ll},
    extras, st.one_of(st.lists(message, max_size=4), json_value), field,
)  # fmt: skip


# Plausible bodies, most of them valid, reach the paths behind validation: scoring, generation,
# the shared-context protocol.
words = st.text(st.sampled_from(list("abc xyz.,!é🙂中\n")), min_size=1, max_size=60)
plausible_options = st.fixed_dictionaries(
    {},
    optional={
        "continuations": st.lists(words, min_size=1, max_size=5),
        "scope": st.sampled_from(["prompt", "last_message", "rolling"]),
        "top_logprobs": st.integers(0, 6), "content": st.booleans(),
    },
)  # fmt: skip
plausible_extras = st.fixed_dictionaries(
    {"model": st.just(MODEL)},
    optional={"max_tokens": st.sampled_from([0, 0, 1, 3]), "n": st.integers(1, 5),
              "logprobs": st.integers(0, 6), "echo": st.booleans()},
)  # fmt: skip
plausible_completion = st.builds(
    lambda extra, prompt, ll: {**extra, "prompt": prompt, "loglikelihood": ll},
    plausible_extras, st.one_of(words, st.lists(words, min_size=1, max_size=3),
                                st.lists(st.integers(0, 1000), min_size=1, max_size=30)),
    st.one_of(st.just(True), plausible_options),
)  # fmt: skip
plausible_chat = st.builds(
    lambda extra, messages, ll: {**extra, "messages": messages, "loglikelihood": ll},
    plausible_extras,
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                    "content": words}), min_size=1, max_size=4),
    st.one_of(st.just(True), plausible_options),
)  # fmt: skip


def test_generated_loglikelihood_bodies_get_no_500(guarded, llm):
    seen: dict[int, int] = {}

    @SETTINGS
    @given(path_and_body=st.one_of(
        st.tuples(st.just("/v1/completions"), completion_body),
        st.tuples(st.just("/v1/chat/completions"), chat_body),
        st.tuples(st.just("/v1/completions"), plausible_completion),
        st.tuples(st.just("/v1/chat/completions"), plausible_chat),
    ))  # fmt: skip
    def one(path_and_body):
        path, body = path_and_body
        response = send(guarded, path, body)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert_answered(response)

    one()
    print("\nhypothesis bodies by status:", dict(sorted(seen.items())))
    assert seen.get(400, 0) >= EXAMPLES // 4 and seen.get(200, 0) >= EXAMPLES // 8  # both reached
    assert_still_correct(guarded, llm)


def test_openapi_generated_bodies_get_no_500(guarded, llm):
    import schemathesis

    schema = schemathesis.openapi.from_url(
        guarded.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    seen: dict[int, int] = {}
    for path in ("/v1/completions", "/v1/chat/completions"):
        strategy = schema[path]["POST"].as_strategy()

        @settings(SETTINGS, max_examples=EXAMPLES // 2)
        @given(case=strategy)
        def one(case):
            body = case.body if isinstance(case.body, dict) else {}
            # Half the bodies ask for a score; the rest are what the schema gives (often none).
            if hash(json.dumps(body, sort_keys=True, default=str)) % 2:
                body = dict(body, loglikelihood=body.get("loglikelihood") or True)
            body = {**body, "model": MODEL}
            body.pop("stream", None)  # a stream of generation is stock vLLM's, not ours
            if "loglikelihood" not in body or not body["loglikelihood"]:
                return  # stock vLLM's own handling: not what this plugin answers for
            response = send(guarded, path, body)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert_answered(response)

        one()
    print("\nschemathesis bodies by status:", dict(sorted(seen.items())))
    assert sum(seen.values()) >= EXAMPLES // 4
    assert_still_correct(guarded, llm)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"model": "tiny", "prompt": "\xff\xfe", "max_tokens": 0, "loglikelihood": true}', 400),
        (b'{"model": "tiny", "prompt": "\\ud800 x", "max_tokens": 0, "loglikelihood": true}', 400),
        (b'{"model": "tiny", "prompt": "a", "loglikelihood": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        (b'{"model": "tiny", "prompt": "a", "loglikelihood": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", 400),
        (b"[1, 2, 3]", 400),
        (b'{"model": "tiny", "prompt": [1, 5, 99999999], "max_tokens": 0, "loglikelihood": true}', 400),
        (b'{"model": "tiny", "prompt": [1, 5, -1], "max_tokens": 0, "loglikelihood": true}', 400),
        (b'{"model": "tiny", "prompt": "a", "max_tokens": 0, "loglikelihood": {"continuations": [[1, 99999999]]}}', 400),
        (b'{"model": "tiny", "prompt": 1e400, "max_tokens": 0, "loglikelihood": true}', 400),
    ],
    ids=["invalid-utf8", "lone-surrogate", "deep-lists", "deep-objects", "not-an-object",
         "token-id-too-big", "token-id-negative", "continuation-ids", "huge-number"],
)  # fmt: skip
def test_malformed_bodies_are_400_in_the_openai_shape(guarded, raw, status):
    response = send(guarded, "/v1/completions", raw=raw)
    assert response.status_code == status, response.text[:500]
    assert_answered(response)


def test_errors_quote_a_short_excerpt_of_the_input(guarded):
    long_key = "k" * 5000
    cases = [
        ("/v1/completions", {"prompt": "a", "loglikelihood": {long_key: 1}}, "loglikelihood"),
        ("/v1/completions", {"prompt": "a", "loglikelihood": {"top_logprobs": long_key}},
         "loglikelihood"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800" + LONG}],
                                  "loglikelihood": True}, "messages[0].content"),
    ]  # fmt: skip
    for path, body, field in cases:
        response = send(guarded, path, {"model": MODEL, "max_tokens": 0, **body})
        assert response.status_code == 400, response.text[:300]
        message = response.json()["error"]["message"]
        assert field in message, message[:300]
        assert "k" * 60 not in message and "x" * 60 not in message
        assert len(message) <= 1100
    # A model name that the server does not serve gets vLLM's own answer (its 404, as for a
    # request without the field), whatever vLLM quotes of it.
    body = {"prompt": "a", "model": "m" * 5000, "max_tokens": 0}
    scored = send(guarded, "/v1/completions", dict(body, loglikelihood=True))
    stock = send(guarded, "/v1/completions", dict(body, max_tokens=1))
    assert scored.status_code == stock.status_code == 404
    assert scored.json() == stock.json() and scored.json()["error"]["param"] == "model"


def test_each_cap_refuses_past_it_and_names_its_variable(guarded):
    """Every cap answers 400 (naming the field) or 413, with its environment variable."""
    base = {"model": MODEL, "max_tokens": 0}
    words = " ".join(["word"] * 30)  # 90 tokens: "word " is 3 tokens of the demo tokenizer
    cases = [
        ({"prompt": "a" * 2_100_000, "loglikelihood": True}, 413, "VLLM_LOGLIK_MAX_BODY_BYTES"),
        ({"prompt": "a", "loglikelihood": {"continuations": ["b"] * 17}}, 400,
         "VLLM_LOGLIK_MAX_CONTINUATIONS"),
        ({"prompt": [words] * 1000, "loglikelihood": {"continuations": [" a"] * 16,
          "content": False}}, 413, "VLLM_LOGLIK_MAX_SCORED_TOKENS"),
        ({"prompt": " a" * 450_000, "loglikelihood": {"scope": "rolling"}}, 400,
         "VLLM_LOGLIK_MAX_ROLLING_WINDOWS"),
        ({"prompt": "a b", "loglikelihood": {"top_logprobs": 6}}, 400,
         "VLLM_LOGLIK_MAX_TOP_LOGPROBS"),
        ({"prompt": "a b", "logprobs": 6, "loglikelihood": True}, 400,
         "VLLM_LOGLIK_MAX_TOP_LOGPROBS"),
        ({"prompt": "a b", "loglikelihood": True, "max_tokens": 2, "n": 5}, 400,
         "VLLM_LOGLIK_MAX_N"),
    ]  # fmt: skip
    for body, status, variable in cases:
        response = send(guarded, "/v1/completions", dict(base, **body))
        assert response.status_code == status, (variable, response.text[:500])
        assert variable in response.json()["error"]["message"]
        assert_answered(response)
    # A body sent in chunks, with no Content-Length, is counted as it arrives.
    def chunks():
        yield b'{"model": "tiny", "max_tokens": 0, "loglikelihood": true, "prompt": "'
        for _ in range(25):
            yield b"a" * 100_000
        yield b'"}'

    response = httpx.post(guarded.url + "/v1/completions", content=chunks(), timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 413, response.text[:300]
    assert "VLLM_LOGLIK_MAX_BODY_BYTES" in response.json()["error"]["message"]
    # Chat is capped the same way.
    chat = {"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}],
            "loglikelihood": {"continuations": ["a"] * 17}}  # fmt: skip
    response = send(guarded, "/v1/chat/completions", chat)
    assert response.status_code == 400 and "VLLM_LOGLIK_MAX_CONTINUATIONS" in response.text
    # Just under the caps, the same requests are served.
    ok = dict(base, prompt="a", loglikelihood={"continuations": ["b"] * 16})
    assert send(guarded, "/v1/completions", ok).status_code == 200


# ---------------------------------------------------------------- disconnects


def gauges(server) -> tuple[float, float, float]:
    """vLLM's running and waiting requests, and the prompt tokens that it has computed (not
    read from the prefix cache)."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    values = {"running": 0.0, "waiting": 0.0, "computed": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        key = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
               "vllm:prompt_tokens_by_source_total": "computed"}.get(name)  # fmt: skip
        if key == "computed" and 'source="local_compute"' not in line:
            continue
        if key:
            values[key] += float(line.rsplit(" ", 1)[1])
    return values["running"], values["waiting"], values["computed"]


def wait_idle(server, within: float) -> float:
    """Seconds until the engine has no running or waiting request (fails after `within`)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        running, waiting, _ = gauges(server)
        if running == 0 and waiting == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"the engine still has requests {within} s after the client left")


def small_request_seconds(server) -> float:
    body = {"model": MODEL, "prompt": "A small request.", "max_tokens": 0, "loglikelihood": True}
    start = time.perf_counter()
    assert send(server, "/v1/completions", body).status_code == 200
    return time.perf_counter() - start


@pytest.mark.parametrize(("shape", "leave_after"), [("rolling", 1.5), ("warm-up", 0.5)])
def test_a_dropped_request_is_aborted_in_the_engine(guarded, shape, leave_after):
    """A client that times out on a large request: the engine stops computing its tokens, has
    no running or waiting request soon after, and the next request is as fast as before.

    Scored in full, the rolling request computes 360,000 prompt tokens (about 6 s here); the
    other is left while its 900 shared contexts are warmed up, before any continuation."""
    before = small_request_seconds(guarded)
    if shape == "rolling":  # 360,000 tokens in about 2,900 windows
        body = {"prompt": "word " * 120_000, "loglikelihood": {"scope": "rolling", "content": False}}
        total = 360_000
    else:  # 900 contexts of about 110 tokens to warm up, then 3 continuations of each
        contexts = [f"Context {i}: " + "word " * 35 for i in range(900)]
        body = {"prompt": contexts, "loglikelihood": {"continuations": [" c1", " c2", " c3"],
                                                      "content": False}}  # fmt: skip
        total = 900 * 110 * 4  # the warm-up and three cached attempts, were nothing cached
    body.update(model=MODEL, max_tokens=0)
    computed = gauges(guarded)[2]
    with pytest.raises(httpx.TimeoutException):
        send(guarded, "/v1/completions", body, timeout=httpx.Timeout(120, read=leave_after))
    idle_after = wait_idle(guarded, within=10)
    time.sleep(1)
    done = gauges(guarded)[2] - computed
    assert done < 0.6 * total, (done, total)  # the rest of its work was never computed
    after = small_request_seconds(guarded)
    assert after < max(1.0, 5 * before), (before, after)
    print(f"\n{shape}: idle {idle_after:.2f} s after the client left, {done:,.0f} of about "
          f"{total:,} tokens computed; small request {before * 1000:.0f} ms before, "
          f"{after * 1000:.0f} ms after")


def test_many_clients_leaving_wedge_nothing(guarded, llm):
    """Sixteen clients send large requests at once and time out; the server is then idle and
    correct."""
    body = {"model": MODEL, "max_tokens": 0, "prompt": "word " * 40_000,
            "loglikelihood": {"scope": "rolling", "content": False}}  # fmt: skip

    async def go() -> None:
        async with httpx.AsyncClient(
            base_url=guarded.url, headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(60, read=0.5),
        ) as client:  # fmt: skip
            results = await asyncio.gather(
                *(client.post("/v1/completions", json=body) for _ in range(16)),
                return_exceptions=True,
            )
        assert any(isinstance(r, httpx.TimeoutException) for r in results)

    asyncio.run(go())
    wait_idle(guarded, within=15)
    assert_still_correct(guarded, llm)


# ---------------------------------------------------------------- fetches


class Listener:
    """A local TCP port that counts the connections made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("max_tokens", [0, 2])
def test_non_text_parts_are_refused_before_any_fetch(guarded, max_tokens):
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}/x"
    parts = [
        {"type": "image_url", "image_url": {"url": url + ".png"}},
        {"type": "audio_url", "audio_url": {"url": url + ".wav"}},
        {"type": "video_url", "video_url": {"url": url + ".mp4"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": url}},
    ]
    try:
        for part in parts:
            for ll in (True, {"continuations": ["a"]}, {"scope": "last_message"}):
                messages = [{"role": "user", "content": [{"type": "text", "text": "see"}, part]},
                            {"role": "assistant", "content": "ok"}]  # fmt: skip
                body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                        "loglikelihood": ll}  # fmt: skip
                response = send(guarded, "/v1/chat/completions", body)
                assert response.status_code == 400, response.text[:500]
                assert response.json()["error"]["param"] == "messages[0].content"
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()

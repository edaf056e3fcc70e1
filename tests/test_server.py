"""A real `vllm serve` with the plugin, driven by the real `openai` client and by raw HTTP."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

import vllm_loglik
from tests.conftest import API_KEY, MAX_MODEL_LEN
from tests.test_offline import (
    CHAT,
    MERGED,
    PAIRS,
    TOL,
    assert_matches,
    chat_reference_ids,
    reference_split,
)
from vllm_loglik.protocol import LoglikelihoodEntry, entries

MODEL = "tiny"


def assert_same(entry: LoglikelihoodEntry, score: vllm_loglik.Score) -> None:
    """A server entry carries the offline API's numbers."""
    assert [t.token_id for t in entry.content] == score.token_ids
    assert entry.num_tokens == score.num_tokens
    assert entry.is_greedy == score.is_greedy
    for got, want in zip(entry.content, score.tokens, strict=True):
        assert abs(got.logprob - want.logprob) <= TOL
        assert got.rank == want.rank
        assert got.token == want.token and got.bytes == want.bytes
        assert [a.token_id for a in got.top_logprobs] == [a.token_id for a in want.top_logprobs]
    assert abs(entry.logprob - score.logprob) <= TOL * max(1, score.num_tokens)


def post(server, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    # json.dumps escapes non-ASCII, so that a lone surrogate travels as `\ud800`, as any JSON
    # client may send it (httpx's `json=` would fail to encode it).
    content = json.dumps(body)
    return httpx.post(server.url + path, content=content, headers=headers, timeout=120)


def test_completion_continuations_match_offline_and_transformers(server, llm, ref):
    client = server.client()
    by_context: dict[str, list[tuple[int, str]]] = {}
    for i, (context, continuation) in enumerate(PAIRS):
        by_context.setdefault(context, []).append((i, continuation))
    offline = vllm_loglik.loglikelihood(llm, PAIRS, top_logprobs=3)
    for context, items in by_context.items():
        response = client.completions.create(
            model=MODEL,
            prompt=context,
            max_tokens=0,
            extra_body={
                "loglikelihood": {"continuations": [c for _, c in items], "top_logprobs": 3}
            },
        )
        (choice,) = response.choices
        got = entries(choice)
        assert [e.index for e in got] == list(range(len(items)))
        for entry, (i, continuation) in zip(got, items, strict=True):
            assert entry.text == continuation
            assert_same(entry, offline[i])
            ctx, cont = reference_split(ref.tokenizer, context, continuation)
            assert_matches(offline[i], ref, ctx + cont, len(ctx))
            assert all(len(t.top_logprobs) == 3 for t in entry.content)


def test_merges_across_the_boundary_on_both_endpoints(server, llm, ref):
    """The boundary rule holds for text and token-id contexts, and for chat candidates."""
    tok = ref.tokenizer
    offline = vllm_loglik.loglikelihood(llm, MERGED)
    for (context, continuation), score in zip(MERGED, offline, strict=True):
        for prompt in (context, tok.encode(context)):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 0,
                    "loglikelihood": {"continuations": [continuation]}}  # fmt: skip
            response = post(server, "/v1/completions", body)
            assert response.status_code == 200, response.text
            (entry,) = response.json()["choices"][0]["loglikelihood"]
            assert_same(LoglikelihoodEntry.model_validate(entry), score)
    # Chat: a candidate whose first characters merge with nothing before them is scored
    # whole, under the template, as the offline API and transformers score it.
    chat = [{"role": "user", "content": "東京は日本の"}]
    candidates = ["首都です。", "🎉🎉", ")"]
    [want] = vllm_loglik.chat_loglikelihood(llm, [chat], candidates=[candidates])
    response = server.client().chat.completions.create(
        model=MODEL, messages=chat, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": candidates}},
    )  # fmt: skip
    for entry, score, text in zip(entries(response.choices[0]), want, candidates, strict=True):
        assert_same(entry, score)
        conversation = chat + [{"role": "assistant", "content": text}]
        assert_matches(score, ref, *chat_reference_ids(tok, conversation))
        assert tok.decode(score.token_ids).startswith(text)


def test_compact_response_has_the_totals_and_no_tokens(server):
    body = {"model": MODEL, "prompt": "Question: Which planet is known as the red planet? Answer:",
            "max_tokens": 0, "logprobs": 3,
            "loglikelihood": {"continuations": [" Mars", " Venus"]}}  # fmt: skip
    full = post(server, "/v1/completions", body).json()["choices"][0]["loglikelihood"]
    body["loglikelihood"]["content"] = False
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    compact = response.json()["choices"][0]["loglikelihood"]
    for c, f in zip(compact, full, strict=True):
        assert set(c) == {"index", "text", "logprob", "num_tokens", "is_greedy"}
        assert (c["index"], c["text"], c["num_tokens"], c["is_greedy"]) == (
            f["index"], f["text"], f["num_tokens"], f["is_greedy"]
        )  # fmt: skip
        assert abs(c["logprob"] - f["logprob"]) <= TOL
        assert LoglikelihoodEntry.model_validate(c).content is None
    # Chat, every mode, through the openai client.
    client = server.client()
    for options in ({"scope": "last_message"}, {"continuations": ["Paris.", "Rome."]}):
        want = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=0, extra_body={"loglikelihood": options}
        )
        got = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=0,
            extra_body={"loglikelihood": dict(options, content=False)},
        )  # fmt: skip
        for c, f in zip(entries(got.choices[0]), entries(want.choices[0]), strict=True):
            assert c.content is None and f.content
            assert c.num_tokens == f.num_tokens and c.is_greedy == f.is_greedy
            assert abs(c.logprob - f.logprob) <= TOL
    # Alternatives need the tokens they belong to.
    body["loglikelihood"]["top_logprobs"] = 2
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400
    assert "loglikelihood.top_logprobs" in response.json()["error"]["message"]


def test_whole_prompt_true_with_text_ids_batch_and_n(server, llm, ref):
    client = server.client()
    texts = ["The quick brown fox jumps over the lazy dog.", "Où est la gare ? 日本"]
    ids = ref.tokenizer.encode("Perplexity is lower when the text is likely.")
    offline = vllm_loglik.prompt_loglikelihood(llm, texts + [ids])

    response = client.completions.create(
        model=MODEL, prompt=texts, max_tokens=0, n=2, extra_body={"loglikelihood": True}
    )
    assert len(response.choices) == 4
    for choice in response.choices:
        (entry,) = entries(choice)
        assert_same(entry, offline[choice.index // 2])
    assert response.usage.prompt_tokens == sum(len(ref.tokenizer.encode(t)) for t in texts)

    # Token-id prompts, as lm-evaluation-harness sends them.
    response = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=0, extra_body={"loglikelihood": True}
    )
    (entry,) = entries(response.choices[0])
    assert_same(entry, offline[2])
    assert_matches(offline[2], ref, ids, 1)
    response = client.completions.create(
        model=MODEL, prompt=[ids, ids[:5]], max_tokens=0, extra_body={"loglikelihood": True}
    )
    assert [len(entries(c)[0].content) for c in response.choices] == [len(ids) - 1, 4]


def test_rolling_scope_scores_a_long_text_as_the_offline_api_does(server, llm, ref):
    from vllm_loglik.testing import default_corpus

    text = default_corpus()[:3000]  # many windows of the test server's 126 tokens
    tokens = ref.tokenizer.encode(text, add_special_tokens=False)
    assert len(tokens) > 4 * (MAX_MODEL_LEN - 2)
    [offline] = vllm_loglik.loglikelihood_rolling(llm, [text], top_logprobs=1)
    client = server.client()
    response = client.completions.create(
        model=MODEL, prompt=text, max_tokens=0,
        extra_body={"loglikelihood": {"scope": "rolling", "top_logprobs": 1}},
    )  # fmt: skip
    (entry,) = entries(response.choices[0])
    assert entry.text == text and entry.num_tokens == len(tokens)
    assert_same(entry, offline)
    assert response.usage.prompt_tokens > len(tokens)  # every window's prompt

    # The compact entry, a token-id prompt (the text's tokens), and several texts at once.
    body = {"model": MODEL, "max_tokens": 0,
            "loglikelihood": {"scope": "rolling", "content": False}}  # fmt: skip
    compact = post(server, "/v1/completions", dict(body, prompt=text)).json()
    (c,) = compact["choices"][0]["loglikelihood"]
    assert "content" not in c and c["num_tokens"] == len(tokens)
    assert abs(c["logprob"] - offline.logprob) <= TOL * len(tokens)
    by_ids = post(server, "/v1/completions", dict(body, prompt=tokens)).json()
    assert by_ids["choices"][0]["loglikelihood"][0]["logprob"] == pytest.approx(c["logprob"], abs=1e-3)
    several = post(server, "/v1/completions", dict(body, prompt=[text, "Short text."])).json()
    [short] = vllm_loglik.loglikelihood_rolling(llm, ["Short text."])
    got = [choice["loglikelihood"][0]["logprob"] for choice in several["choices"]]
    assert got == pytest.approx([offline.logprob, short.logprob], abs=TOL * len(tokens))


def test_token_id_prompt_with_continuations(server, ref):
    ctx = ref.tokenizer.encode("The capital of France is")
    body = {
        "model": MODEL,
        "prompt": ctx,
        "max_tokens": 0,
        "loglikelihood": {"continuations": [" Paris"]},
    }
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    (entry,) = response.json()["choices"][0]["loglikelihood"]
    cont = ref.tokenizer.encode(" Paris", add_special_tokens=False)
    lps, _ = ref.score(ctx + cont, len(ctx))
    assert [t["token_id"] for t in entry["content"]] == cont
    assert all(abs(t["logprob"] - lp) <= TOL for t, lp in zip(entry["content"], lps, strict=True))


def test_generation_logprobs_unchanged_next_to_loglikelihood(server, ref):
    client = server.client()
    common = dict(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0.0)
    plain = client.completions.create(**common, logprobs=2, extra_body={"return_token_ids": True})
    scored = client.completions.create(
        **common, logprobs=2, extra_body={"return_token_ids": True, "loglikelihood": True}
    )
    assert scored.choices[0].text == plain.choices[0].text
    assert scored.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens
    for a, b in zip(
        scored.choices[0].logprobs.token_logprobs,
        plain.choices[0].logprobs.token_logprobs,
        strict=True,
    ):
        assert abs(a - b) <= TOL
    # The generated tokens' logprobs are right, too: check them against transformers.
    prompt_ids = ref.tokenizer.encode("The capital of France is")
    gen_ids = scored.choices[0].token_ids
    lps, _ = ref.score(prompt_ids + gen_ids, len(prompt_ids))
    for got, want in zip(scored.choices[0].logprobs.token_logprobs, lps, strict=True):
        assert abs(got - want) <= TOL
    (entry,) = entries(scored.choices[0])
    assert entry.num_tokens == len(prompt_ids) - 1
    # The loglikelihood's top_logprobs default to the request's `logprobs`.
    assert all(len(t.top_logprobs) == 2 for t in entry.content)
    assert scored.usage.completion_tokens == 4

    chat_plain = client.chat.completions.create(
        model=MODEL, messages=CHAT[:2], max_tokens=3, temperature=0.0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    chat_scored = client.chat.completions.create(
        model=MODEL, messages=CHAT[:2], max_tokens=3, temperature=0.0, logprobs=True,
        top_logprobs=2, extra_body={"loglikelihood": {"scope": "last_message"}},
    )  # fmt: skip
    assert chat_scored.choices[0].message.content == chat_plain.choices[0].message.content
    got = chat_scored.choices[0].logprobs.content
    want = chat_plain.choices[0].logprobs.content
    assert [t.token for t in got] == [t.token for t in want]
    assert all(abs(a.logprob - b.logprob) <= TOL for a, b in zip(got, want, strict=True))
    assert all(len(t.top_logprobs) == 2 for t in got)
    assert entries(chat_scored.choices[0])[0].text == CHAT[1]["content"]


def test_chat_modes_match_offline_and_transformers(server, llm, ref):
    client = server.client()
    (last,) = vllm_loglik.chat_loglikelihood(llm, [CHAT])
    response = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=0,
        extra_body={"loglikelihood": {"scope": "last_message"}},
    )  # fmt: skip
    (entry,) = entries(response.choices[0])
    assert_same(entry, last)
    assert_matches(last, ref, *chat_reference_ids(ref.tokenizer, CHAT))

    candidates = ["The capital of France is Paris.", "It is Rome.", "Berlin 🙂"]
    [offline] = vllm_loglik.chat_loglikelihood(llm, [CHAT[:-1]], candidates=[candidates])
    response = client.chat.completions.create(
        model=MODEL, messages=CHAT[:-1], max_tokens=0,
        extra_body={"loglikelihood": {"continuations": candidates}},
    )  # fmt: skip
    got = entries(response.choices[0])
    assert [e.text for e in got] == candidates
    for entry, score in zip(got, offline, strict=True):
        assert_same(entry, score)
    assert got[0].logprob == pytest.approx(last.logprob, abs=TOL)

    # `true` on chat: the rendered prompt (with the generation prompt), all but its first token.
    response = client.chat.completions.create(
        model=MODEL, messages=CHAT[:-1], max_tokens=0, extra_body={"loglikelihood": True}
    )
    (entry,) = entries(response.choices[0])
    rendered = ref.tokenizer.apply_chat_template(
        CHAT[:-1], tokenize=False, add_generation_prompt=True
    )
    ids = ref.tokenizer.encode(rendered, add_special_tokens=False)
    (score,) = vllm_loglik.prompt_loglikelihood(llm, [ids])
    assert_same(entry, score)
    assert_matches(score, ref, ids, 1)


def test_curl_style_raw_http_and_response_shape(server):
    body = {
        "model": MODEL,
        "prompt": "Question: Which planet is known as the red planet? Answer:",
        "max_tokens": 0,
        "loglikelihood": {"continuations": [" Mars", " Venus"], "top_logprobs": 1},
    }
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "text_completion"
    (choice,) = data["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    mars, venus = (LoglikelihoodEntry.model_validate(e) for e in choice["loglikelihood"])
    assert (mars.index, mars.text, venus.text) == (0, " Mars", " Venus")
    assert mars.logprob == pytest.approx(sum(t.logprob for t in mars.content))
    assert all(len(t.top_logprobs) == 1 and t.rank >= 1 for t in mars.content)
    assert data["usage"]["completion_tokens"] == 0


BAD_REQUESTS = [
    ("/v1/completions", {"loglikelihood": "yes"}, "loglikelihood"),
    ("/v1/completions", {"loglikelihood": 1}, "loglikelihood"),
    ("/v1/completions", {"loglikelihood": {"bogus": 1}}, "loglikelihood.bogus"),
    ("/v1/completions", {"loglikelihood": {"continuations": "a"}}, "loglikelihood.continuations"),
    ("/v1/completions", {"loglikelihood": {"continuations": []}}, "loglikelihood.continuations"),
    (
        "/v1/completions",
        {"loglikelihood": {"continuations": ["a", ""]}},
        "loglikelihood.continuations[1]",
    ),
    (
        "/v1/completions",
        {"loglikelihood": {"continuations": ["x"] * 65}},
        "loglikelihood.continuations",
    ),
    ("/v1/completions", {"loglikelihood": {"top_logprobs": 21}}, "loglikelihood.top_logprobs"),
    ("/v1/completions", {"loglikelihood": {"scope": "last_message"}}, "loglikelihood.scope"),
    ("/v1/completions", {"loglikelihood": {"scope": "everything"}}, "loglikelihood.scope"),
    (
        "/v1/completions",
        {"loglikelihood": {"scope": "rolling", "continuations": ["a"]}},
        "loglikelihood.scope",
    ),
    ("/v1/completions", {"prompt": "", "loglikelihood": {"scope": "rolling"}}, "prompt"),
    ("/v1/chat/completions", {"loglikelihood": {"scope": "rolling"}}, "loglikelihood.scope"),
    ("/v1/completions", {"loglikelihood": True, "stream": True}, "stream"),
    (
        "/v1/completions",
        {"prompt": "word " * 200, "loglikelihood": {"continuations": [" more"]}},
        "loglikelihood.continuations[0]",
    ),
    ("/v1/completions", {"prompt": "word " * 200, "loglikelihood": True}, "prompt"),
    ("/v1/completions", {"prompt": "", "loglikelihood": True}, "prompt"),
    ("/v1/chat/completions", {"loglikelihood": {"top_logprobs": 99}}, "loglikelihood.top_logprobs"),
    ("/v1/chat/completions", {"loglikelihood": True, "stream": True}, "stream"),
    (
        "/v1/chat/completions",
        {"loglikelihood": {"continuations": ["ok", ""]}},
        "loglikelihood.continuations[1]",
    ),
    (
        "/v1/chat/completions",
        {"loglikelihood": {"continuations": ["word " * 200]}},
        "loglikelihood.continuations[0]",
    ),
]

#: Text that no tokenizer can encode: a JSON string holding a lone surrogate.
UNENCODABLE = [
    ("/v1/completions", {"prompt": "Hi \ud800", "loglikelihood": True}, "prompt"),
    (
        "/v1/completions",
        {"prompt": "Hi \ud800", "loglikelihood": {"continuations": [" a"]}},
        "prompt",
    ),
    (
        "/v1/completions",
        {"prompt": ["ok", "Hi \udc00"], "loglikelihood": True},
        "prompt[1]",
    ),
    (
        "/v1/completions",
        {"loglikelihood": {"continuations": [" a", " \ud800"]}},
        "loglikelihood.continuations[1]",
    ),
    (
        "/v1/completions",
        {"prompt": [1, 5, 6], "loglikelihood": {"continuations": ["\ud800"]}},
        "loglikelihood.continuations[0]",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x \ud800"}], "loglikelihood": True},
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        {"loglikelihood": {"continuations": ["fine", "\udfff"]}},
        "loglikelihood.continuations[1]",
    ),
]


@pytest.mark.parametrize(("path", "extra", "param"), BAD_REQUESTS + UNENCODABLE)
def test_bad_input_is_400_naming_the_field_then_next_request_works(server, path, extra, param):
    body = {"model": MODEL, "max_tokens": 0}
    if path == "/v1/completions":
        body["prompt"] = "The capital of France is"
    else:
        body["messages"] = CHAT[:2]
    body.update(extra)
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400 and error["type"]
    assert param in error["message"] or param == error.get("param"), error
    head = param.split("[")[0].split(".")[0]
    assert head in error["message"]

    # The engine is alive and the next request is served.
    good = dict(body, loglikelihood=True, stream=False)
    good.pop("prompt" if path == "/v1/completions" else "messages")
    if path == "/v1/completions":
        good["prompt"] = "The capital of France is"
    else:
        good["messages"] = CHAT[:2]
    response = post(server, path, good)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["loglikelihood"][0]["num_tokens"] > 0


@pytest.mark.parametrize(("path", "extra", "param"), UNENCODABLE)
def test_unencodable_text_is_400_with_param_set(server, path, extra, param):
    body = {"model": MODEL, "max_tokens": 0, "messages": CHAT[:2], "prompt": "Hi"} | extra
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert param in error["message"] and "not valid Unicode" in error["message"]
    assert "TextEncodeInput" not in error["message"]


def test_openai_client_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(
            model=MODEL, prompt="x", max_tokens=0, extra_body={"loglikelihood": {"nope": True}}
        )
    assert "loglikelihood.nope" in str(info.value)
    assert server.alive()


def test_requests_without_the_field_are_stock(server, stock_server):
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 5, "temperature": 0.0,
            "logprobs": 1}  # fmt: skip
    ours = post(server, "/v1/completions", body).json()
    stock = post(stock_server, "/v1/completions", body, key=None).json()
    assert ours["choices"][0]["text"] == stock["choices"][0]["text"]
    assert "loglikelihood" not in ours["choices"][0]
    assert set(ours) == set(stock) and set(ours["choices"][0]) == set(stock["choices"][0])
    # loglikelihood: false is the same as no field.
    off = post(server, "/v1/completions", dict(body, loglikelihood=False)).json()
    assert off["choices"][0]["text"] == stock["choices"][0]["text"]
    assert "loglikelihood" not in off["choices"][0]
    # Streaming still works when the field is absent.
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=dict(body, stream=True),
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
    ) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2
    # Stock vLLM's own errors are unchanged.
    bad = dict(body, max_tokens=-1)
    assert post(server, "/v1/completions", bad).json() == post(
        stock_server, "/v1/completions", bad, key=None
    ).json()


def test_openapi_of_other_routes_is_unchanged(server, stock_server):
    """vLLM's routes are documented as without the plugin, but for the field on the two it
    replaces; the one route it adds, TRL's `/get_sequence_logprobs/`, documents its body."""
    ours = httpx.get(server.url + "/openapi.json").json()
    stock = httpx.get(stock_server.url + "/openapi.json").json()
    assert set(ours["paths"]) == set(stock["paths"]) | {"/get_sequence_logprobs/"}
    teacher = ours["paths"]["/get_sequence_logprobs/"]["post"]
    schema = teacher["requestBody"]["content"]["application/json"]["schema"]
    assert {"sequences", "prompt_lengths", "top_logprobs", "temperature"} <= set(schema["properties"])
    for path, spec in stock["paths"].items():
        if path not in ("/v1/completions", "/v1/chat/completions"):
            assert ours["paths"][path] == spec, path
    replaced = {"CompletionRequest", "ChatCompletionRequest"}  # by the subclasses with the field
    for name, schema in stock["components"]["schemas"].items():
        if name in ours["components"]["schemas"]:
            assert ours["components"]["schemas"][name] == schema, name
        else:
            assert name in replaced, name
    # The two routes document what vLLM's own do (responses, summary, ...), but for the request
    # body, which is the subclass with the field.
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert set(ours["paths"][path]) == set(stock["paths"][path])
        mine, theirs = dict(ours["paths"][path]["post"]), dict(stock["paths"][path]["post"])
        body, stock_body = mine.pop("requestBody"), theirs.pop("requestBody")
        assert mine == theirs, path
        assert str(body).replace("Loglikelihood", "") == str(stock_body), path


def test_server_without_plugin_ignores_the_field(stock_server):
    body = {"model": MODEL, "prompt": "Hello world", "max_tokens": 2,
            "loglikelihood": {"continuations": [" x"]}}  # fmt: skip
    response = post(stock_server, "/v1/completions", body, key=None)
    assert response.status_code == 200
    assert "loglikelihood" not in response.json()["choices"][0]
    spec = httpx.get(stock_server.url + "/openapi.json").json()
    assert "loglikelihood" not in str(spec)


def test_api_key_is_enforced_on_plugin_routes(server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {"model": MODEL, "max_tokens": 0, "loglikelihood": True, "prompt": "x",
                "messages": CHAT[:2]}  # fmt: skip
        assert post(server, path, body, key=None).status_code == 401
        assert post(server, path, body, key="wrong").status_code == 401
        assert post(server, path, body).status_code == 200


def test_openapi_documents_the_field(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("LoglikelihoodCompletionRequest", "LoglikelihoodChatCompletionRequest"):
        assert "loglikelihood" in schemas[name]["properties"]
    assert "LoglikelihoodOptions" in schemas
    assert "content" in schemas["LoglikelihoodOptions"]["properties"]
    ref_of = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    assert "LoglikelihoodCompletionRequest" in str(ref_of)
    # The other routes are untouched.
    assert "/v1/models" in spec["paths"] and "/tokenize" in spec["paths"]


def test_context_length_edge(server, ref):
    # A prompt of exactly max_model_len - 1 tokens is scored; one more is a 400.
    ids = (ref.tokenizer.encode("word " * 200))[: MAX_MODEL_LEN - 1]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 0, "loglikelihood": True}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["loglikelihood"][0]["num_tokens"] == MAX_MODEL_LEN - 2
    response = post(server, "/v1/completions", dict(body, prompt=ids + [ids[-1]]))
    assert response.status_code == 400
    assert "prompt" in response.json()["error"]["message"]


def metric_total(server, name: str) -> float:
    """The sum of a Prometheus counter over its labels, from the server's `/metrics`."""
    text = httpx.get(server.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)
    )


def metric(server, name: str, **labels: str) -> float:
    """The sum of the samples of the Prometheus metric `name` on the server's `/metrics`
    whose labels include `labels` (in any order: a multi-process registry sorts them)."""
    total = 0.0
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        sample, _, rest = head.partition("{")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        if sample == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def prefix_cache_hits(server) -> float:
    return metric_total(server, "vllm:prefix_cache_hits_total")


LONG_CONTEXT = (
    "Question: The river flows past the old mill, under the stone bridge, and on toward the "
    "sea. Every morning the baker opens the shop at six o'clock and sells warm bread to the "
    "neighbours. Scientists measured the temperature of the lake every hour for a year. "
    "Which of these is a building?\nAnswer:"
)
OPTIONS = [" the mill", " the river", " the lake 🙂", " bread"]


def test_shared_context_is_computed_once_and_matches_uncached(server, llm, ref):
    ctx_len = len(ref.tokenizer.encode(LONG_CONTEXT))
    assert ctx_len > 2 * 32 + 1  # spans at least two KV blocks of the test server
    offline = vllm_loglik.loglikelihood(llm, [(LONG_CONTEXT, o) for o in OPTIONS], top_logprobs=2)
    hits_before = prefix_cache_hits(server)
    client = server.client()
    response = client.completions.create(
        model=MODEL, prompt=LONG_CONTEXT, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": OPTIONS, "top_logprobs": 2}},
    )  # fmt: skip
    for entry, score in zip(entries(response.choices[0]), offline, strict=True):
        assert_same(entry, score)
    # Each continuation read the context's full blocks from the prefix cache.
    assert prefix_cache_hits(server) - hits_before >= len(OPTIONS) * 64
    for (context, option), score in zip([(LONG_CONTEXT, o) for o in OPTIONS], offline, strict=True):
        ctx, cont = reference_split(ref.tokenizer, context, option)
        assert_matches(score, ref, ctx + cont, len(ctx))

    # Chat candidates share their rendered head the same way.
    chat = [{"role": "user", "content": LONG_CONTEXT}]
    [offline_chat] = vllm_loglik.chat_loglikelihood(llm, [chat], candidates=[OPTIONS])
    response = client.chat.completions.create(
        model=MODEL, messages=chat, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": OPTIONS}},
    )  # fmt: skip
    for entry, score in zip(entries(response.choices[0]), offline_chat, strict=True):
        assert_same(entry, score)


def test_cached_path_under_concurrent_requests(server, llm):
    import concurrent.futures

    contexts = [LONG_CONTEXT, LONG_CONTEXT.replace("building", "place"), LONG_CONTEXT + " Hmm."]
    requests = [(c, OPTIONS[i % 4 :] + OPTIONS[: i % 4]) for i, c in enumerate(contexts * 4)]
    expected = {
        (c, o): s
        for c in contexts
        for o, s in zip(OPTIONS, vllm_loglik.loglikelihood(llm, [(c, o) for o in OPTIONS]),
                        strict=True)
    }  # fmt: skip

    def ask(item):
        context, options = item
        body = {"model": MODEL, "prompt": context, "max_tokens": 0,
                "loglikelihood": {"continuations": options}}  # fmt: skip
        # lm-eval style too: the same context again, one continuation per request.
        single = dict(body, loglikelihood={"continuations": options[:1]})
        return post(server, "/v1/completions", body), post(server, "/v1/completions", single)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, requests))
    for (context, options), (many, single) in zip(requests, results, strict=True):
        assert many.status_code == 200 and single.status_code == 200
        got = many.json()["choices"][0]["loglikelihood"]
        for option, entry in zip(options, got, strict=True):
            assert_same(LoglikelihoodEntry.model_validate(entry), expected[(context, option)])
        (one,) = single.json()["choices"][0]["loglikelihood"]
        assert_same(LoglikelihoodEntry.model_validate(one), expected[(context, options[0])])
    assert server.alive()


def test_lm_eval_local_completions_wire_format_agrees(server, llm, ref):
    """lm-evaluation-harness's `local-completions` model (tokenized requests) sends token-id
    prompts with echo and reads `token_logprobs[ctxlen:-1]`; through the plugin's server that
    stock path still works, and gives our numbers."""
    pairs = [PAIRS[0], PAIRS[2], (LONG_CONTEXT, OPTIONS[0])]
    split = [reference_split(ref.tokenizer, c, x) for c, x in pairs]
    payload = {
        "model": MODEL,
        "prompt": [ctx + cont for ctx, cont in split],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    response = post(server, "/v1/completions", payload)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    ours = vllm_loglik.loglikelihood(llm, pairs)
    for choice, (ctx, _), score in zip(choices, split, ours, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][len(ctx) : -1]
        top = choice["logprobs"]["top_logprobs"][len(ctx) : -1]
        is_greedy = all(lp == max(t.values()) for lp, t in zip(token_logprobs, top, strict=True))
        assert sum(token_logprobs) == pytest.approx(score.logprob, abs=1e-3)
        assert is_greedy == score.is_greedy
        # The same pair through the loglikelihood field, as token ids.
        body = {"model": MODEL, "prompt": ctx, "max_tokens": 0,
                "loglikelihood": {"continuations": [score.text]}}  # fmt: skip
        entry = post(server, "/v1/completions", body).json()["choices"][0]["loglikelihood"][0]
        assert abs(entry["logprob"] - score.logprob) <= 1e-3


def test_generation_error_is_passed_through_with_loglikelihood(server):
    # Generation runs in vLLM's own handler; its 400 comes back as it is, and the server lives.
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 500}
    stock = post(server, "/v1/completions", body)
    ours = post(server, "/v1/completions", dict(body, loglikelihood=True))
    assert stock.status_code == ours.status_code == 400
    assert ours.json()["error"]["message"] == stock.json()["error"]["message"]
    assert server.alive()

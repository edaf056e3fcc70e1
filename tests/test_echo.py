"""Echo acceleration (`vllm_loglik/server/echo.py`): a completions request that only scores
(echo with logprobs, `max_tokens` 0 or 1) gets vLLM's own answer, field by field, while the
prompts that share a prefix read its logprobs instead of computing them again.

The reference is plain vLLM: the same model behind a server without the plugin
(`stock_server`), or, under a LoRA adapter, the same server asked with `prompt_logprobs` in the
body (which vLLM treats exactly as echo does, and the plugin leaves to vLLM).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os

import numpy as np
import pytest

from tests.test_server import LONG_CONTEXT, MODEL, metric, metric_total, post
from tests.test_v2_layout import rewrites
from vllm_loglik.server import echo

from .lm_eval_runs import lm_eval, loglikelihoods

OTHER_CONTEXT = (
    "Story: A small boat left the harbour before dawn, its lantern swinging in the wind. The "
    "fisherman counted his nets twice, then sang an old song about the islands.\nNext:"
)
CONTINUATIONS = [" the mill", " the river", " a lake 🙂", " bread and salt", ""]


OWN = {"id", "created", "system_fingerprint"}


def same(ours, plain, path: str = "") -> None:
    """`ours` equals `plain` field by field: the same keys, strings, ids and lengths, numbers
    within 1e-4 (aside from the response's `id`, `created` and `system_fingerprint`, a hash of
    the server's configuration, which has LoRA on where the plain server has not)."""
    if isinstance(plain, dict):
        keys = set(plain) - OWN
        assert set(ours) - OWN == keys, path
        for key in keys:
            same(ours[key], plain[key], f"{path}.{key}")
    elif isinstance(plain, list):
        assert isinstance(ours, list) and len(ours) == len(plain), path
        for i, (a, b) in enumerate(zip(ours, plain, strict=True)):
            same(a, b, f"{path}[{i}]")
    elif isinstance(plain, float) and not isinstance(ours, bool):
        assert ours == pytest.approx(plain, abs=1e-4), path
    else:
        assert ours == plain, path


def same_answer(ours: dict, plain: dict, body: dict) -> None:
    """`same`, where the token that `max_tokens: 1` generates may differ only as greedy decoding
    breaks a tie: the prompt's positions are computed from cached KV blocks here and from
    scratch there, and on a random test model two best logits can be closer than float32 noise.
    Then both generated tokens have the same logprob (within 1e-4), and the rest is equal."""
    ours = json.loads(json.dumps(ours))
    if body.get("max_tokens") == 1 and body.get("logprobs") is not None:
        for mine, theirs in zip(ours["choices"], plain["choices"], strict=True):
            a, b = mine["logprobs"], theirs["logprobs"]
            if a["tokens"][-1] == b["tokens"][-1]:
                continue
            assert a["token_logprobs"][-1] == pytest.approx(b["token_logprobs"][-1], abs=1e-4)
            # The echoed prompt is the same; only the generated token's text (a few characters)
            # after it differs.
            common = os.path.commonprefix([mine["text"], theirs["text"]])
            assert len(common) >= max(len(mine["text"]), len(theirs["text"])) - 8
            mine["text"] = theirs["text"]
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                a[key][-1] = b[key][-1]
            if mine.get("token_ids") is not None:
                mine["token_ids"] = theirs["token_ids"]
    same(ours, plain)


def bodies(tokenizer) -> list[dict]:
    """Echo requests that only score: text and token-id prompts, one prompt and several per
    request, k = 1 and 5, max_tokens 0 and 1 (lm-eval's local-completions sends the last)."""
    out = []
    ids = tokenizer.encode(OTHER_CONTEXT)
    for k in (1, 5):
        for max_tokens in (0, 1):
            common = {"model": MODEL, "echo": True, "logprobs": k, "max_tokens": max_tokens,
                      "temperature": 0}  # fmt: skip
            for cont in CONTINUATIONS[:3]:
                out.append(dict(common, prompt=LONG_CONTEXT + cont))
            out.append(dict(common, prompt=[ids + tokenizer.encode(c, add_special_tokens=False)
                                            for c in CONTINUATIONS[1:4]]))  # fmt: skip
    out.append({"model": MODEL, "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0,
                "prompt": [LONG_CONTEXT + c for c in CONTINUATIONS]})  # fmt: skip
    return out


def test_echo_requests_equal_plain_vllm_field_by_field(server, stock_server, ref):
    requests = bodies(ref.tokenizer)
    before = metric_total(server, "vllm_loglik:echo_requests_total")
    shared = metric_total(server, "vllm_loglik:echo_shared_tokens_total")
    for body in requests:
        ours, plain = post(server, "/v1/completions", body), post(stock_server, "/v1/completions", body, key=None)
        assert ours.status_code == plain.status_code == 200, ours.text
        same_answer(ours.json(), plain.json(), body)
    assert metric_total(server, "vllm_loglik:echo_requests_total") - before == len(requests)
    # The context's blocks (16 positions each) were read, not computed, after its first prompt.
    assert metric_total(server, "vllm_loglik:echo_shared_tokens_total") - shared >= 20 * 32
    assert server.alive()


def test_concurrent_requests_share_contexts_in_flight(server, stock_server):
    """One pair per request, all in flight at once, as lm-eval sends them: the prompts of a
    context wait for the one computing it, and read its rows."""
    contexts = [f"{LONG_CONTEXT} ({n})" for n in range(3)]
    requests = [
        {"model": MODEL, "prompt": ctx + cont, "echo": True, "logprobs": 1, "max_tokens": 1,
         "temperature": 0}
        for ctx in contexts for cont in CONTINUATIONS[:4]
    ]  # fmt: skip
    shared = metric_total(server, "vllm_loglik:echo_shared_tokens_total")
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        ours = list(pool.map(lambda b: post(server, "/v1/completions", b), requests))
    for body, response in zip(requests, ours, strict=True):
        plain = post(stock_server, "/v1/completions", body, key=None)
        assert response.status_code == 200, response.text
        same_answer(response.json(), plain.json(), body)
    # New contexts: each one's first prompt computed it, and the other three read 64 or more
    # of its positions (the context is about 70 tokens; rows are kept in blocks of 16).
    assert metric_total(server, "vllm_loglik:echo_shared_tokens_total") - shared >= 3 * 3 * 64


def test_an_adapters_and_the_base_models_prefixes_never_mix(server):
    """The same prompts under the base model and two adapters, in turns: each equals vLLM's own
    answer under its model (the same request with `prompt_logprobs`, which vLLM serves alone),
    and the models' numbers differ, so rows read across models would show."""
    answers: dict[str, list[float]] = {}
    for _ in range(2):
        for model in (MODEL, "adapter-a", "adapter-b"):
            for cont in CONTINUATIONS[:2]:
                body = {"model": model, "prompt": OTHER_CONTEXT + cont, "echo": True,
                        "logprobs": 2, "max_tokens": 1, "temperature": 0}  # fmt: skip
                before = metric(server, "vllm_loglik:echo_prompts_total", model=model)
                ours = post(server, "/v1/completions", body)
                plain = post(server, "/v1/completions", dict(body, prompt_logprobs=2))
                assert ours.status_code == plain.status_code == 200, ours.text
                same_answer(ours.json(), plain.json(), body)
                assert metric(server, "vllm_loglik:echo_prompts_total", model=model) == before + 1
                answers[model] = ours.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    base = np.array(answers[MODEL])
    for adapter in ("adapter-a", "adapter-b"):
        assert np.abs(np.array(answers[adapter]) - base).max() > 1e-3


def test_v2_layout(v2_server, stock_server):
    """On the V2 model runner's layout (simulated: `tests/v2_layout`), the tails of cached
    prompts are read from the rows the engine returns for its computed positions only."""
    before = len(rewrites(v2_server))
    for cont in CONTINUATIONS:
        body = {"model": MODEL, "prompt": f"{OTHER_CONTEXT} (v2){cont}", "echo": True,
                "logprobs": 3, "max_tokens": 1, "temperature": 0}  # fmt: skip
        ours = post(v2_server, "/v1/completions", body, key=None)
        assert ours.status_code == 200, ours.text
        same_answer(ours.json(), post(stock_server, "/v1/completions", body, key=None).json(), body)
    rows = rewrites(v2_server)[before:]
    assert len(rows) >= len(CONTINUATIONS) - 1  # every prompt after the first read the cache
    assert all(v2 == v1 - cached for _, v1, cached, v2 in rows)
    assert metric_total(v2_server, "vllm_loglik:fallbacks_total") == metric(
        v2_server, "vllm_loglik:fallbacks_total", reason="prompt_logprobs_path"
    )  # no output was unreadable


def test_requests_that_do_more_than_score_are_vllms(server, stock_server):
    """Generation, streaming, several choices, `prompt_logprobs` of the client's own: vLLM's."""
    common = {"model": MODEL, "prompt": LONG_CONTEXT, "temperature": 0}
    requests = [
        dict(common, echo=True, logprobs=1, max_tokens=3),
        dict(common, echo=True, max_tokens=1),
        dict(common, echo=False, logprobs=1, max_tokens=1),
        dict(common, echo=True, logprobs=1, max_tokens=1, prompt_logprobs=1),
        dict(common, echo=True, logprobs=1, max_tokens=1, stop=["the"]),
    ]
    before = metric_total(server, "vllm_loglik:echo_requests_total")
    for body in requests:
        ours, plain = post(server, "/v1/completions", body), post(stock_server, "/v1/completions", body, key=None)
        assert ours.status_code == plain.status_code == 200, ours.text
        same(ours.json(), plain.json())
    several = dict(common, echo=True, logprobs=1, max_tokens=1, n=2, temperature=1.0, seed=1)
    assert len(post(server, "/v1/completions", several).json()["choices"]) == 2
    stream = dict(common, echo=True, logprobs=1, max_tokens=1, stream=True)
    assert post(server, "/v1/completions", stream).text.count("data:") >= 2
    assert metric_total(server, "vllm_loglik:echo_requests_total") == before


def test_lm_evals_local_completions_gives_plain_vllms_numbers(server, stock_server, model_path, tmp_path):
    """lm-eval's own `local-completions` model against the accelerated server and against
    plain vLLM: the same per-sample loglikelihoods, greedy flags and accuracy."""
    runs = {}
    for name, srv in (("ours", server), ("plain", stock_server)):
        args = ["--model", "local-completions", "--model_args",
                f"model={MODEL},base_url={srv.url}/v1/completions,num_concurrent=4,"
                f"max_retries=1,tokenizer_backend=huggingface,tokenizer={model_path}",
                "--tasks", "loglik_mc"]  # fmt: skip
        runs[name] = lm_eval(args, tmp_path / name)
    (results, samples), (plain_results, plain_samples) = runs["ours"], runs["plain"]
    assert results["loglik_mc"]["acc,none"] == plain_results["loglik_mc"]["acc,none"]
    assert len(samples["loglik_mc"]) == len(plain_samples["loglik_mc"]) >= 4
    for a, b in zip(samples["loglik_mc"], plain_samples["loglik_mc"], strict=True):
        assert a["doc_id"] == b["doc_id"]
        assert loglikelihoods(a) == pytest.approx(loglikelihoods(b), abs=1e-4)
        assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]


def test_trl_teacher_requests_equal_plain_vllm_and_share_the_prompt(server, stock_server, ref):
    """TRL 1.16's teacher request (`VLLMClient.get_sequence_logprobs`): token-id sequences of one
    prompt in one request, `prompt_logprobs: k`, `max_tokens: 1`, its temperature. vLLM's own
    answer field by field (`prompt_logprobs` within 1e-4; the generated token is vLLM's sample),
    with the prompt computed once and read by the other sequences."""
    rng = np.random.default_rng(11)
    prompt = ref.tokenizer.encode(OTHER_CONTEXT + " (teacher)")
    group = [prompt + rng.integers(3, 500, n).tolist() for n in (6, 9, 3, 12)]
    before = metric_total(server, "vllm_loglik:echo_requests_total")
    shared = metric_total(server, "vllm_loglik:echo_shared_tokens_total")
    for temperature, k in ((0.0, 5), (1.0, 2), (0.7, 0)):
        body = {"model": MODEL, "prompt": group, "max_tokens": 1, "temperature": temperature,
                "prompt_logprobs": k, "seed": 3}  # fmt: skip
        ours, plain = post(server, "/v1/completions", body), post(stock_server, "/v1/completions", body, key=None)
        assert ours.status_code == plain.status_code == 200, ours.text
        mine, theirs = ours.json(), plain.json()
        for a, b in zip(mine["choices"], theirs["choices"], strict=True):
            same(a.pop("prompt_logprobs"), b.pop("prompt_logprobs"))
            if temperature:  # a sample, under the same seed: the same unless two logits tie
                a.pop("text"), b.pop("text"), a.pop("token_ids", None), b.pop("token_ids", None)
        same(mine, theirs)
    assert metric_total(server, "vllm_loglik:echo_requests_total") - before == 3
    # After the first sequence, each of the others read the prompt's rows (kept in blocks of 16).
    blocks = (len(prompt) // 16 - 1) * 16
    assert blocks >= 32
    assert metric_total(server, "vllm_loglik:echo_shared_tokens_total") - shared >= 3 * 3 * blocks


def test_the_switch_and_the_plan(monkeypatch):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    monkeypatch.setenv(echo.ENV, "0")
    assert "turned off" in echo.problem(32, None)
    monkeypatch.setenv(echo.ENV, "1")
    assert echo.problem(None, None).startswith("no prefix-cache reads (prefix caching is off")
    assert echo.problem(32, None) is None
    scoring = {"model": "m", "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 1}
    assert echo.echo_plan(CompletionRequest(**scoring), "m") == echo.EchoPlan(1, "m")
    assert echo.echo_plan(CompletionRequest(**dict(scoring, max_tokens=0)), "m") is not None
    for other in ({"max_tokens": 2}, {"echo": False}, {"logprobs": None}, {"n": 2},
                  {"stream": True}, {"prompt_logprobs": 1}, {"stop": ["a"]}):  # fmt: skip
        assert echo.echo_plan(CompletionRequest(**dict(scoring, **other)), "m") is None
    # TRL's teacher request: prompt logprobs, no echo.
    teacher = {"model": "m", "prompt": [[1, 2, 3]], "prompt_logprobs": 5, "max_tokens": 1,
               "temperature": 0.7}  # fmt: skip
    assert echo.echo_plan(CompletionRequest(**teacher), "m") == echo.EchoPlan(5, "m")
    for other in ({"prompt_logprobs": 21}, {"prompt_logprobs": -1}, {"logprobs": 21},
                  {"max_tokens": 2}, {"n": 2}):  # fmt: skip
        assert echo.echo_plan(CompletionRequest(**dict(teacher, **other)), "m") is None


def _rows(n: int, k: int, seed: int) -> echo.Rows:
    rng = np.random.default_rng(seed)
    return echo.Rows(
        rng.integers(0, 100, (n, k + 1)), rng.normal(size=(n, k + 1)).astype(np.float32),
        rng.integers(1, 9, n),
    )  # fmt: skip


def test_prefix_rows_wait_for_a_prefix_in_flight_and_stay_bounded():
    async def main() -> None:
        cache = echo.PrefixRows(granularity=4, max_bytes=10_000)
        root = ("base", None, 1)
        first, second = list(range(20)), list(range(14)) + [99] * 6
        owner = await cache.acquire(root, first)
        assert owner.known == 0 and len(owner.claims) == 4  # positions 1-16 in blocks of 4
        waiter = asyncio.ensure_future(cache.acquire(root, second))
        await asyncio.sleep(0)
        assert not waiter.done()  # it waits for the block that the owner computes
        rows = _rows(19, 1, 0)
        cache.release(owner, rows)
        got = await waiter
        # The rows of positions 1-12 depend on tokens 0-12, which both prompts share; those of
        # 13-16 on tokens 14 and 15 too, which differ.
        assert got.known == 12
        assert np.array_equal(echo.Rows.concat(got.rows, 1).logprobs, rows.logprobs[:12])
        cache.release(got, None)  # a failed request stores nothing
        other = await cache.acquire(("adapter-a", None, 1), first)
        assert other.known == 0  # another model's rows are never read
        for seed in range(200):  # many prompts: the oldest blocks go
            ids = [seed + 1000] * 20
            lookup = await cache.acquire(root, ids)
            cache.release(lookup, _rows(19, 1, seed))
        assert cache.bytes <= 10_000
        assert (await cache.acquire(root, first)).known == 0

    asyncio.run(main())

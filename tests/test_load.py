"""Load: many mixed requests from concurrent clients on the test server, every number checked.

The mix covers both endpoints and every mode (prompt, continuations, token ids, rolling, chat
last message, chat candidates, and requests that also generate). Every request's text is its
own, so a response that carried another request's numbers would not match. Each response must
be a 200 whose entries equal the offline API's for the same input (1e-4 per token, float32).
Two identical rounds run. The API server's process, where the plugin runs, may grow by at most
`API_SERVER_BOUND_MB` over the second round. The engine's worker grows too, stock vLLM's as
much: the CPU backend's KV cache (`VLLM_CPU_KVCACHE_SPACE`) is touched page by page as prefix
caching fills more blocks (measured over 8 rounds of 500: +164, +99, +109, +83, +54, +27, +26,
+15 MB with the plugin; +122, +38, +46, +40, +50, +33, +32, +35 MB for stock prompt_logprobs
requests); the whole server may grow by no more than that cache plus `API_SERVER_BOUND_MB`.

`make test` runs `LOAD_REQUESTS` (160) requests from 32 clients per round; `make soak`
(VLLM_LOGLIK_SOAK=1) runs 500. The figures are printed (pytest -s shows them) and written to
`load-report.json` in the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import httpx
import psutil

import vllm_loglik
from vllm_loglik.testing import default_corpus

from .conftest import API_KEY, SOAK

LOAD_REQUESTS = 500 if SOAK else 160
CLIENTS = 32
#: Growth of the API server's resident memory over a second identical round, after a first
#: round has warmed every cache and pool (measured: 0 to 2 MB).
API_SERVER_BOUND_MB = 16
MODEL = "tiny"
WORDS = default_corpus().split()


def text(i: int, n: int) -> str:
    """A text of `n` words that differs for every `i`."""
    start = (i * 7) % (len(WORDS) - n)
    return f"Item {i}: " + " ".join(WORDS[start : start + n])


def bodies(count: int) -> list[tuple[str, dict]]:
    """`count` mixed requests (path, body), each with its own text."""
    out = []
    for i in range(count):
        kind = i % 8
        if kind == 0:
            out.append(("/v1/completions", {"prompt": text(i, 12), "loglikelihood": True}))
        elif kind == 1:
            out.append(("/v1/completions", {"prompt": text(i, 10) + " Answer:", "loglikelihood": {
                "continuations": [" yes", " no", f" maybe {i}", " 🙂"], "content": False}}))  # fmt: skip
        elif kind == 2:
            out.append(("/v1/completions", {"prompt": text(i, 120),
                                             "loglikelihood": {"scope": "rolling"}}))  # fmt: skip
        elif kind == 3:
            messages = [{"role": "user", "content": text(i, 6)},
                        {"role": "assistant", "content": text(i + 1, 5)}]  # fmt: skip
            out.append(("/v1/chat/completions",
                        {"messages": messages, "loglikelihood": {"scope": "last_message"}}))  # fmt: skip
        elif kind == 4:
            out.append(("/v1/chat/completions", {
                "messages": [{"role": "user", "content": text(i, 8)}],
                "loglikelihood": {"continuations": ["Red.", f"Number {i}."], "top_logprobs": 2}}))  # fmt: skip
        elif kind == 5:
            out.append(("/v1/completions", {"prompt": text(i, 8), "loglikelihood": True,
                                             "max_tokens": 3, "temperature": 0}))  # fmt: skip
            continue
        elif kind == 6:
            out.append(("/v1/chat/completions", {
                "messages": [{"role": "user", "content": text(i, 7)}], "loglikelihood": True,
                "max_tokens": 2, "temperature": 0}))  # fmt: skip
            continue
        else:
            ids = [1] + [200 + (i * 13 + j * 7) % 700 for j in range(9)]
            out.append(("/v1/completions", {"prompt": ids, "loglikelihood": {
                "continuations": [" x", " y"]}}))  # fmt: skip
        out[-1][1]["max_tokens"] = 0
    for _, body in out:
        body["model"] = MODEL
    return out


def expected(llm, path: str, body: dict) -> list[vllm_loglik.Score]:
    """The offline API's scores for one body."""
    field = body["loglikelihood"]
    options = field if isinstance(field, dict) else {}
    k = options.get("top_logprobs", 0)
    if path.endswith("chat/completions"):
        messages = body["messages"]
        if "continuations" in options:
            return vllm_loglik.chat_loglikelihood(
                llm, [messages], candidates=[options["continuations"]], top_logprobs=k
            )[0]
        if options.get("scope") == "last_message":
            return vllm_loglik.chat_loglikelihood(llm, [messages], top_logprobs=k)
        from vllm_loglik.offline import run_jobs, scorer_for

        job = scorer_for(llm).chat_prompt(messages, True, {})  # the rendered prompt
        return run_jobs(llm, [job], k, False)
    prompt = body["prompt"]
    if options.get("scope") == "rolling":
        return vllm_loglik.loglikelihood_rolling(llm, [prompt])
    if "continuations" in options and isinstance(prompt, list):  # a token-id context
        from vllm_loglik.offline import run_jobs, scorer_for

        jobs = [scorer_for(llm).pair_ids(prompt, c) for c in options["continuations"]]
        return run_jobs(llm, jobs, 0, False)
    if "continuations" in options:
        return vllm_loglik.loglikelihood(llm, [(prompt, c) for c in options["continuations"]])
    return vllm_loglik.prompt_loglikelihood(llm, [prompt])


def check(response: dict, want: list[vllm_loglik.Score], generated: bool) -> None:
    choices = response["choices"]
    assert len(choices) == 1
    got = choices[0]["loglikelihood"]
    assert len(got) == len(want)
    for entry, score in zip(got, want, strict=True):
        assert entry["text"] == score.text
        assert entry["num_tokens"] == score.num_tokens
        assert entry["is_greedy"] == score.is_greedy
        assert abs(entry["logprob"] - score.logprob) <= 1e-4 * max(1, score.num_tokens)
        if "content" in entry:
            assert [t["token_id"] for t in entry["content"]] == score.token_ids
            for t, s in zip(entry["content"], score.tokens, strict=True):
                assert abs(t["logprob"] - s.logprob) <= 1e-4
    if generated:
        message = choices[0].get("message")
        assert (message["content"] if message else choices[0]["text"]) is not None


def server_rss_mb(server) -> tuple[float, float]:
    """Resident memory (MB) of the API server process, and of it with the engine's processes."""
    proc = psutil.Process(server.proc.pid)
    every = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    return proc.memory_info().rss / 2**20, every / 2**20


async def round_of(server, work: list[tuple[str, dict]]) -> tuple[list[float], list[dict]]:
    """Send `work` from `CLIENTS` concurrent clients; latencies (s) and response bodies."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in enumerate(work):
        queue.put_nowait(item)
    latencies = [0.0] * len(work)
    results: list[dict] = [{}] * len(work)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def client() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300) as http:
            while not queue.empty():
                i, (path, body) = queue.get_nowait()
                start = time.perf_counter()
                response = await http.post(path, json=body)
                latencies[i] = time.perf_counter() - start
                assert response.status_code == 200, (i, response.text[:500])
                results[i] = response.json()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return latencies, results


def test_mixed_load_from_32_clients_is_correct_and_memory_is_bounded(server, llm, tmp_path):
    work = bodies(LOAD_REQUESTS)
    want = [expected(llm, path, body) for path, body in work]
    report = {"requests_per_round": len(work), "clients": CLIENTS, "rounds": []}
    memory = [server_rss_mb(server)]
    for _ in range(2):
        start = time.perf_counter()
        latencies, results = asyncio.run(round_of(server, work))
        wall = time.perf_counter() - start
        for (path, body), result, scores in zip(work, results, want, strict=True):
            check(result, scores, body.get("max_tokens", 0) > 0)
        memory.append(server_rss_mb(server))
        cuts = statistics.quantiles(latencies, n=100)
        report["rounds"].append({
            "wall_s": round(wall, 2), "errors": 0, "p50_s": round(cuts[49], 3),
            "p99_s": round(cuts[98], 3), "requests_per_s": round(len(work) / wall, 1),
        })  # fmt: skip
    for i, name in enumerate(("api_server_mb", "server_mb")):
        report[name] = {"before": round(memory[0][i]), "after_round_1": round(memory[1][i]),
                        "after_round_2": round(memory[2][i])}  # fmt: skip
    (tmp_path / "load-report.json").write_text(json.dumps(report, indent=2))
    print("\nload:", json.dumps(report))
    assert server.alive()
    assert memory[2][0] - memory[1][0] <= API_SERVER_BOUND_MB, report
    kv_cache_mb = float(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * 1024
    assert memory[2][1] - memory[1][1] <= kv_cache_mb + API_SERVER_BOUND_MB, report

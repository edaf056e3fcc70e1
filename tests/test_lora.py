"""Scoring under LoRA adapters: offline (`lora_request=`), on the server (`model` naming an
adapter of `--lora-modules`, or one loaded at run time), and in the batch CLI.

Two random adapters of the demo model are built with peft; the reference for each is a plain
transformers + peft forward pass of the same adapter in float32 (1e-4 per token, the same
`is_greedy`). The server's numbers must equal the offline API's under the same adapter, and the
base model's must stay its own while adapters are in use.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import vllm_loglik
from vllm_loglik.offline import scorer_for
from vllm_loglik.protocol import LoglikelihoodEntry, entries

from .conftest import ADAPTERS, LORA_TARGETS, MAX_MODEL_LEN, Reference
from .test_offline import CHAT, TOL
from .test_server import LONG_CONTEXT, MODEL, OPTIONS, assert_same, post, prefix_cache_hits

PAIRS = [(LONG_CONTEXT, o) for o in OPTIONS] + [("日本語: 東京は", "日本の首都です。"), ("", "Hello")]
PROMPT = "Perplexity under a fine-tune: every token but the first."
ROLLING = " ".join(["The adapter scores this long text in several windows."] * 12)
NAMES = list(ADAPTERS)


class AdapterReference(Reference):
    """transformers + peft: the base model with one adapter, in float32."""

    def __init__(self, path: str, adapter: str):
        super().__init__(path)
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(self.model, adapter).eval()


@pytest.fixture(scope="module")
def refs(model_path, lora_paths, ref) -> dict[str | None, Reference]:
    out: dict[str | None, Reference] = {None: ref}
    for name, path in lora_paths.items():
        out[name] = AdapterReference(model_path, path)
    return out


@pytest.fixture(scope="module")
def lora_requests(lora_paths):
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, ADAPTERS[name], lora_paths[name]) for name in NAMES}


@pytest.fixture(scope="module")
def lora_llm(llm):
    """The session's engine, which has LoRA enabled."""
    return llm


@pytest.fixture(scope="module")
def lora_server(server):
    """The session's server, which serves the adapters (`--lora-modules`)."""
    return server


def assert_reference(score: vllm_loglik.Score, job, ref: Reference) -> None:
    """`score` against a forward pass of `ref` over the spans of `job` (the prompts that the
    engine scored): every token within TOL, and the same `is_greedy`."""
    expected, greedy = [], True
    for span in job.spans:
        lps, span_greedy = ref.score(span.prompt_token_ids, span.start)
        expected += lps
        greedy = greedy and span_greedy
    assert score.token_ids == [t for span in job.spans for t in span.scored_token_ids]
    assert len(score.tokens) == len(expected)
    for token, lp in zip(score.tokens, expected, strict=True):
        assert abs(token.logprob - lp) <= TOL, (token, lp)
    assert score.is_greedy == greedy


def offline_scores(llm, lora_request):
    """Every mode of the offline API under `lora_request`, with the jobs that it scored."""
    scorer = scorer_for(llm)
    kw = {"lora_request": lora_request}
    pairs = vllm_loglik.loglikelihood(llm, PAIRS, top_logprobs=2, **kw)
    [prompt] = vllm_loglik.prompt_loglikelihood(llm, [PROMPT], **kw)
    [rolling] = vllm_loglik.loglikelihood_rolling(llm, [ROLLING], **kw)
    [last] = vllm_loglik.chat_loglikelihood(llm, [CHAT], **kw)
    [candidates] = vllm_loglik.chat_loglikelihood(llm, [CHAT[:-1]], candidates=[OPTIONS], **kw)
    jobs = (
        [scorer.pair(c, o) for c, o in PAIRS] + [scorer.prompt(PROMPT), scorer.rolling(ROLLING)]
        + [scorer.chat(CHAT)] + [scorer.chat(CHAT[:-1], o) for o in OPTIONS]
    )  # fmt: skip
    return [*pairs, prompt, rolling, last, *candidates], jobs


def test_offline_api_scores_under_an_adapter(lora_llm, lora_requests, refs):
    assert len(ROLLING) and len(scorer_for(lora_llm).rolling(ROLLING).spans) >= 2
    totals = {}
    for name in [None, *NAMES]:
        scores, jobs = offline_scores(lora_llm, lora_requests.get(name))
        for score, job in zip(scores, jobs, strict=True):
            assert_reference(score, job, refs[name])
        totals[name] = [s.logprob for s in scores]
    # The adapters change the model: each gives numbers of its own.
    assert totals[None] != totals[NAMES[0]] != totals[NAMES[1]] != totals[None]


#: The requests that `server_entries` sends.
SERVER_REQUESTS = 1 + (len(PAIRS) - len(OPTIONS)) + 4


def server_entries(server, model: str) -> list[LoglikelihoodEntry]:
    """Every mode through both endpoints under `model`, in the order of `offline_scores`."""
    client = server.client()
    out = []
    r = client.completions.create(
        model=model, prompt=LONG_CONTEXT, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": OPTIONS, "top_logprobs": 2}},
    )  # fmt: skip
    out += entries(r.choices[0])
    for context, option in PAIRS[len(OPTIONS) :]:
        r = client.completions.create(
            model=model, prompt=context, max_tokens=0,
            extra_body={"loglikelihood": {"continuations": [option], "top_logprobs": 2}},
        )  # fmt: skip
        out += entries(r.choices[0])
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=0,
                                  extra_body={"loglikelihood": True})  # fmt: skip
    out += entries(r.choices[0])
    r = client.completions.create(model=model, prompt=ROLLING, max_tokens=0,
                                  extra_body={"loglikelihood": {"scope": "rolling"}})  # fmt: skip
    out += entries(r.choices[0])
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=0,
                                       extra_body={"loglikelihood": {"scope": "last_message"}})  # fmt: skip
    out += entries(r.choices[0])
    r = client.chat.completions.create(model=model, messages=CHAT[:-1], max_tokens=0,
                                       extra_body={"loglikelihood": {"continuations": OPTIONS}})  # fmt: skip
    out += entries(r.choices[0])
    return out


def test_server_scores_under_adapters_in_every_mode(lora_server, lora_llm, lora_requests):
    for name in [MODEL, *NAMES]:
        expected, _ = offline_scores(lora_llm, lora_requests.get(name))
        hits = prefix_cache_hits(lora_server)
        got = server_entries(lora_server, name)
        assert len(got) == len(expected)
        for entry, score in zip(got, expected, strict=True):
            assert_same(entry, score)
        # The shared context was read from the cache, under this adapter.
        assert prefix_cache_hits(lora_server) - hits >= len(OPTIONS) * 64


def test_base_and_two_adapters_concurrent_and_interleaved(lora_server, lora_llm, lora_requests):
    """The same question under the base model and both adapters, sent at once and in turns:
    a context cached under one is never read for another."""
    expected = {
        name: vllm_loglik.loglikelihood(
            lora_llm, [(LONG_CONTEXT, o) for o in OPTIONS], lora_request=lora_requests.get(name)
        )
        for name in [MODEL, *NAMES]
    }  # fmt: skip
    assert len({round(s[0].logprob, 3) for s in expected.values()}) == 3

    def ask(name: str) -> tuple[str, httpx.Response]:
        body = {"model": name, "prompt": LONG_CONTEXT, "max_tokens": 0,
                "loglikelihood": {"continuations": OPTIONS}}  # fmt: skip
        return name, post(lora_server, "/v1/completions", body)

    order = [MODEL, *NAMES] * 4 + NAMES[::-1] + [MODEL]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, order))
    for name, response in results:
        assert response.status_code == 200, response.text
        got = response.json()["choices"][0]["loglikelihood"]
        for entry, score in zip(got, expected[name], strict=True):
            assert_same(LoglikelihoodEntry.model_validate(entry), score)


def test_v2_layout_server_reads_cached_rows_under_an_adapter(v2_server, lora_llm, lora_requests):
    """On the server that returns prompt logprobs in the GPU runner's (V2) layout: every mode
    under an adapter, the shared context read from the cache in that layout."""
    from .test_v2_layout import rewrites

    name = NAMES[1]
    expected, _ = offline_scores(lora_llm, lora_requests[name])
    before = len(rewrites(v2_server))
    got = server_entries(v2_server, name)
    for entry, score in zip(got, expected, strict=True):
        assert_same(entry, score)
    cached = [row for row in rewrites(v2_server)[before:] if row[2] > 0]
    assert len(cached) >= len(OPTIONS)  # V2-layout rows, shorter by the cached tokens
    assert all(v2 == v1 - c for _, v1, c, v2 in cached)


def test_generation_next_to_scoring_under_an_adapter(lora_server, lora_llm, lora_requests):
    name = NAMES[0]
    [score] = vllm_loglik.loglikelihood(lora_llm, [PAIRS[0]], lora_request=lora_requests[name])
    r = post(lora_server, "/v1/completions", {
        "model": name, "prompt": PAIRS[0][0], "max_tokens": 3, "temperature": 0,
        "loglikelihood": {"continuations": [PAIRS[0][1]]},
    })  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["model"] == name and choice["text"]
    assert_same(LoglikelihoodEntry.model_validate(choice["loglikelihood"][0]), score)


def test_unknown_model_gets_vllms_own_404_and_the_server_goes_on(lora_server):
    for path, body in (
        ("/v1/completions", {"prompt": "Hello", "loglikelihood": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "loglikelihood": {"continuations": ["Hello"]}}),
    ):  # fmt: skip
        scored = post(lora_server, path, dict(body, model="no-such-adapter", max_tokens=0))
        # What vLLM itself answers for the same name without the field.
        plain = {k: v for k, v in body.items() if k != "loglikelihood"}
        stock = post(lora_server, path, dict(plain, model="no-such-adapter", max_tokens=1))
        assert scored.status_code == stock.status_code == 404
        assert scored.json() == stock.json()
        assert scored.json()["error"]["param"] == "model"
        assert "no-such-adapter" in scored.json()["error"]["message"]
    assert lora_server.alive()
    r = post(lora_server, "/v1/completions",
             {"model": NAMES[0], "prompt": "Hello", "max_tokens": 0, "loglikelihood": True})  # fmt: skip
    assert r.status_code == 200


def test_adapter_loaded_at_run_time(lora_server, lora_llm, lora_requests, lora_paths):
    """`/v1/load_lora_adapter` (VLLM_ALLOW_RUNTIME_LORA_UPDATING, set on the session's
    server): the new name scores as the adapter that it loads."""
    r = post(lora_server, "/v1/load_lora_adapter",
             {"lora_name": "late", "lora_path": lora_paths[NAMES[1]]})  # fmt: skip
    assert r.status_code == 200, r.text
    expected = vllm_loglik.loglikelihood(
        lora_llm, [(LONG_CONTEXT, o) for o in OPTIONS], lora_request=lora_requests[NAMES[1]]
    )
    r = post(lora_server, "/v1/completions", {
        "model": "late", "prompt": LONG_CONTEXT, "max_tokens": 0,
        "loglikelihood": {"continuations": OPTIONS},
    })  # fmt: skip
    assert r.status_code == 200, r.text
    for entry, score in zip(r.json()["choices"][0]["loglikelihood"], expected, strict=True):
        assert_same(LoglikelihoodEntry.model_validate(entry), score)


def test_batch_cli_lines_name_an_adapter_or_the_base(
    model_path, lora_paths, lora_llm, lora_requests, tmp_path
):
    lines = [
        {"id": "base", "prompt": LONG_CONTEXT, "loglikelihood": {"continuations": OPTIONS}},
        {"id": "a", "model": NAMES[0], "prompt": LONG_CONTEXT,
         "loglikelihood": {"continuations": OPTIONS}},
        {"id": "b-rolling", "model": NAMES[1], "prompt": ROLLING,
         "loglikelihood": {"scope": "rolling"}},
        {"id": "base-named", "model": model_path, "prompt": PROMPT},
        {"id": "a-chat", "model": NAMES[0], "messages": CHAT[:-1],
         "loglikelihood": {"continuations": OPTIONS}},
        {"id": "unknown", "model": "nope", "prompt": PROMPT},
    ]  # fmt: skip
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    cli = str(Path(sys.executable).parent / "vllm-loglik")
    modules = [f"{n}={p}" for n, p in lora_paths.items()]
    run = subprocess.run(
        [cli, "score", model_path, "--input", str(source), "--output", str(out),
         "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
         "--block-size", "32", "--enable-lora", "--max-lora-rank", "8",
         "--lora-target-modules", *LORA_TARGETS, "--lora-modules", *modules],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]  # one line failed: exit 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [line["id"] for line in lines]
    pairs = [(LONG_CONTEXT, o) for o in OPTIONS]
    a, b = (lora_requests[n] for n in NAMES)
    expected = {
        "base": vllm_loglik.loglikelihood(lora_llm, pairs),
        "a": vllm_loglik.loglikelihood(lora_llm, pairs, lora_request=a),
        "b-rolling": vllm_loglik.loglikelihood_rolling(lora_llm, [ROLLING], lora_request=b),
        "base-named": vllm_loglik.prompt_loglikelihood(lora_llm, [PROMPT]),
        "a-chat": vllm_loglik.chat_loglikelihood(
            lora_llm, [CHAT[:-1]], candidates=[OPTIONS], lora_request=a
        )[0],
    }
    for record in records[:-1]:
        got = record["loglikelihood"]
        want = expected[record["id"]]
        assert len(got) == len(want)
        for entry, score in zip(got, want, strict=True):
            assert entry["num_tokens"] == score.num_tokens
            assert entry["is_greedy"] == score.is_greedy
            assert abs(entry["logprob"] - score.logprob) <= TOL * score.num_tokens
    assert records[-1]["error"]["param"] == "model"
    assert "nope" in records[-1]["error"]["message"]


def test_lora_on_the_output_layer_is_refused_before_any_engine_work(model_path, tmp_path):
    """vLLM 0.32 computes prompt logprobs through a LoRA output layer with the wrong mapping
    (it stops the CPU engine): without `--lora-target-modules` (or with `lm_head` in it), the
    batch CLI stops at once with the remedy, the offline API and the server refuse to score."""
    from types import SimpleNamespace

    from vllm_loglik.engine_requests import lora_scoring_problem

    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "Hello"}\n')
    cli = str(Path(sys.executable).parent / "vllm-loglik")
    for extra in (["--lora-target-modules", "q_proj", "lm_head"],):  # no flag: unit-tested below
        run = subprocess.run(
            [cli, "score", model_path, "--input", str(source), "--output", str(tmp_path / "o"),
             "--enable-lora", *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 1 and "--lora-target-modules" in run.stderr, run.stderr[-2000:]
        assert "Loading safetensors" not in run.stderr  # no engine was started
    def config(targets):
        return SimpleNamespace(lora_config=SimpleNamespace(target_modules=targets))

    assert lora_scoring_problem(SimpleNamespace(lora_config=None)) is None
    assert lora_scoring_problem(config(LORA_TARGETS)) is None
    assert "lm_head" in lora_scoring_problem(config(None))
    assert lora_scoring_problem(config(["q_proj", "lm_head"])) is not None


def test_lm_eval_server_model_scores_under_an_adapter(lora_server, lora_llm, lora_requests, tmp_path):
    """`vllm-loglik eval --model vllm-loglik` with `model=ADAPTER`: lm-eval's per-sample
    loglikelihoods are the offline API's under that adapter."""
    from .lm_eval_runs import greedy, lm_eval, loglikelihoods

    name = NAMES[0]
    _, samples = lm_eval(
        ["--model", "vllm-loglik", "--model_args",
         f"base_url={lora_server.url}/v1/completions,model={name},num_concurrent=4,max_retries=1",
         "--tasks", "loglik_mc"],
        tmp_path / "lm-eval",
    )  # fmt: skip
    for sample in samples["loglik_mc"]:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        want = vllm_loglik.loglikelihood(lora_llm, pairs, lora_request=lora_requests[name])
        assert loglikelihoods(sample) == pytest.approx([s.logprob for s in want], abs=1e-4)
        assert greedy(sample) == [s.is_greedy for s in want]


def test_openai_batch_lines_name_an_adapter_or_the_base(server, lora_llm, lora_requests, tmp_path):
    """The OpenAI Batch format through the server (`--server`): a body's `model` picks the
    adapter, as in the CLI's own format; an unknown one gets the server's 404 in its line."""
    from .test_batch import batch_line, read, score

    bodies = [("base", None), ("a", NAMES[0]), ("b", NAMES[1]), ("unknown", "nope")]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(
        batch_line(cid, {"prompt": LONG_CONTEXT, "loglikelihood": {"continuations": OPTIONS},
                         **({"model": model} if model else {})}) + "\n"
        for cid, model in bodies
    ))  # fmt: skip
    run = score(["--server", server.url, "--input", str(source), "--output", str(tmp_path / "o")])
    assert run.returncode == 1, run.stderr[-3000:]
    records = read(tmp_path / "o")
    assert [r["custom_id"] for r in records] == [cid for cid, _ in bodies]
    pairs = [(LONG_CONTEXT, o) for o in OPTIONS]
    for record, (_, model) in zip(records[:-1], bodies, strict=False):
        body = record["response"]["body"]
        assert record["response"]["status_code"] == 200 and body["model"] == (model or MODEL)
        want = vllm_loglik.loglikelihood(lora_llm, pairs, lora_request=lora_requests.get(model))
        for entry, score_ in zip(body["choices"][0]["loglikelihood"], want, strict=True):
            assert_same(LoglikelihoodEntry.model_validate(entry), score_)
    assert records[-1]["response"]["status_code"] == 404
    assert records[-1]["error"]["param"] == "model" and "nope" in records[-1]["error"]["message"]

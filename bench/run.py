"""`make bench`: the speed and memory of scoring, as ratios against baselines in the same run.

Builds a ~100M-parameter Llama-shaped model (8 layers, hidden 768, a 32k BPE vocabulary trained
on the Python standard library's source, bf16) in `.cache/bench-model`, then measures:

1. server: the `loglikelihood` field against vLLM's native `prompt_logprobs=0`, same server;
2. server: the `loglikelihood` field against plain prefill (`max_tokens=1`, no logprobs);
3. offline: `vllm_loglik.prompt_loglikelihood` against transformers forward + log_softmax +
   gather (batch 8), on the same tokens;
4. multiple choice: one request per question (4 continuations) against each (context,
   continuation) as its own native prompt-logprobs request, as lm-eval's vLLM backend does;
5. memory: peak RSS of the server's process tree while scoring one 8,000-token prompt with
   `top_logprobs=5`, against plain prefill of the same prompt;
6. front-end: the API-server process's own CPU time per scored position (psutil; the engine
   core is a process of its own), the plugin against native `prompt_logprobs`, at k = 0 (the
   full per-token response) and at k = 5. On a GPU this cost, not the forward pass, decides
   the throughput;
7. offline multiple choice: `vllm_loglik.loglikelihood` on an `LLM` with prefix caching on and
   `block_size=32`, against one native `prompt_logprobs` prompt per pair in one `generate` call;
8. lm-eval: the wall time of lm-eval's CLI on a 4-choice task with long contexts, the
   `vllm-loglik` model against lm-eval's `local-completions`, on the same server;
9. batch: scored tokens per second of `vllm-loglik score`'s engine loop on 2,000 mixed lines,
   against the offline API called once on the same jobs;
10. lm-eval in process: `simple_evaluate` on a 4-choice task with 1,000-token contexts,
    `--model vllm-loglik-offline` against lm-eval's own `--model vllm`, the same model and
    `--model_args`, each in a process of its own, timed after the model is built and warmed
    up on other questions;
11. the same on a rolling (perplexity) task of long documents;
12. token-id responses (`bench/token_responses.py`): one 1,000-token prompt and 16 responses of
    200 tokens, as token ids, with `vllm_loglik.loglikelihood_tokens` (the prompt computed once)
    against native `prompt_logprobs` on each prompt + response.

Rows 1-3 and 6 run twice: with vLLM's CPU default of one core reserved for the front-end
(`VLLM_CPU_NUM_OF_RESERVED_CPU=1`), and with none (`=0`). Rows 4 and 5 use the setting that
`RESERVED` names, and so do rows 7 and 8. Row 4 runs twice: with the CPU default KV block of 128
tokens, and with 32. Prefix caching is off except in row 4, where the cache is the thing measured.
Every row runs in the dtype that the CPU runs natively: bfloat16 where the CPU has
`avx512_bf16` or `amx_bf16`, else float32 (bf16 is emulated there, hundreds of times slower,
and a ratio would measure the emulation); the JSON records the dtype and the CPU's model and
flags. `--only KEY[,KEY]` re-runs some rows (keys of the JSON: `offline`, `server`,
`multiple_choice`, `offline_multiple_choice`, `batch`, `lm_eval`, `lm_eval_offline`,
`token_responses`) and keeps
the others' figures from the existing JSON.
Prints a markdown table and writes the figures as JSON (`bench/latest.json`, or `--json PATH`).
`--smoke` runs the same code on the tiny test model with a few prompts, to keep this script
working (`make test` runs it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from docs_tables import write_docs_table  # noqa: E402
from token_responses import table_row as token_responses_row  # noqa: E402
from token_responses import token_responses  # noqa: E402
from vllm_loglik.testing import ApiServer  # noqa: E402

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# GiB of KV cache per engine; the CPU default (92% of NUMA node 0) fails next to anything else.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


@dataclass
class Size:
    name: str
    prompts: int  # rows 1-3: prompts of `prompt_len` tokens
    prompt_len: int
    questions: int  # row 4
    context_len: int
    continuation_len: int
    memory_len: int  # row 5
    repeats: int
    settings: tuple[int, ...]  # values of VLLM_CPU_NUM_OF_RESERVED_CPU, for rows 1-3 and 6
    block_sizes: tuple[int, ...]  # KV block sizes, for row 4
    offline_questions: int = 16  # row 7
    lm_eval_questions: int = 32  # row 8
    batch_lines: int = 2000  # row 9
    lm_offline_questions: int = 32  # row 10
    rolling_docs: int = 8  # row 11: documents of `rolling_doc_len` tokens
    rolling_doc_len: int = 4000
    clients: int = 4
    responses: int = 16  # row 12: responses of `response_len` tokens to one `context_len` prompt
    response_len: int = 200


#: The setting of `VLLM_CPU_NUM_OF_RESERVED_CPU` that rows 4 and 5 use.
RESERVED = 0
# Full: vLLM's CPU default of 1 reserved core, and 0; the CPU default KV block of 128 tokens,
# and 32, the smallest that the CPU attention takes. Smoke: one of each, to stay quick.
FULL = Size("full", 32, 512, 64, 1000, 5, 8000, 2, (1, 0), (128, 32))
SMOKE = Size("smoke", 4, 64, 3, 300, 5, 400, 1, (RESERVED,), (32,), 2, 3, 25, 3, 2, 300,
             responses=4, response_len=20)


def cpu_info() -> dict:
    """The CPU's model name and the flags that decide the native dtype and the kernels."""
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return {"model": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def native_dtype(cpu: dict) -> str:
    """bfloat16 where the CPU computes it natively, else float32 (see the module docstring)."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(cpu["flags"]) else "float32"


def stdlib_text(limit_bytes: int) -> str:
    """Text that ships with Python: the standard library's source, in a fixed order."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text("utf-8", errors="ignore")
        parts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return "".join(parts)


def build(size: Size) -> str:
    from vllm_loglik.testing import BENCH, build_model, build_tiny_model

    if size.name == "smoke":
        return str(build_tiny_model(ROOT / ".cache" / "demo-model"))
    return str(build_model(ROOT / ".cache" / "bench-model", BENCH, corpus=stdlib_text(8_000_000)))


def token_prompts(model: str, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `length` tokens: BOS + slices of the stdlib text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.encode(stdlib_text(2_000_000)[seed * 100_000 :], add_special_tokens=False)
    step = max(1, (len(ids) - length) // max(n, 1))
    return [[tok.bos_token_id] + ids[i * step : i * step + length - 1] for i in range(n)]


# ---------------------------------------------------------------- offline (row 3), in a child


def offline_rows(model: str, size: Size, dtype: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm_loglik

    prompts = token_prompts(model, size.prompts, size.prompt_len)
    llm = LLM(
        model, dtype=dtype, max_model_len=size.prompt_len + 16, enforce_eager=True,
        enable_prefix_caching=False, seed=0,
    )  # fmt: skip
    hf = LlamaForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def transformers_scores() -> None:
        with torch.no_grad():
            for i in range(0, len(prompts), 8):
                batch = torch.tensor(prompts[i : i + 8])
                logits = hf(batch).logits[:, :-1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                logprobs.gather(2, batch[:, 1:, None]).sum()

    def ours() -> None:
        vllm_loglik.prompt_loglikelihood(llm, prompts)

    def native() -> None:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def prefill() -> None:
        params = SamplingParams(max_tokens=1)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    ours()  # warm-up
    transformers_scores()
    t: dict[str, list[float]] = {"transformers": [], "ours": [], "native": [], "prefill": []}
    for _ in range(size.repeats):
        for name, fn in (
            ("transformers", transformers_scores), ("ours", ours), ("native", native),
            ("prefill", prefill),
        ):  # fmt: skip
            start = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in t.items()}


# ---------------------------------------------------------------- server (rows 1, 2, 4, 5)


def reserved_env(reserved: int) -> dict[str, str]:
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)}


def serve(
    model: str, dtype: str, max_model_len: int, caching: bool, port: int, reserved: int,
    block_size: int | None = None,
) -> ApiServer:  # fmt: skip
    args = [
        "--served-model-name", "bench", "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--enforce-eager", "--seed", "0", "--max-logprobs", "20",
    ]  # fmt: skip
    if not caching:
        args.append("--no-enable-prefix-caching")
    if block_size:
        args += ["--block-size", str(block_size)]
    log = ROOT / ".cache" / f"bench-server-{port}.log"
    return ApiServer(model, args, log, port=port, timeout=600, env=reserved_env(reserved))


async def run_bodies(url: str, bodies: list[dict], clients: int) -> tuple[float, list[dict]]:
    """Send `bodies` to /v1/completions from `clients` concurrent workers; wall time, responses."""
    import httpx

    results: list[dict] = [{}] * len(bodies)
    queue = list(enumerate(bodies))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i, body = queue.pop(0)
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text[:500]}")
            results[i] = r.json()

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - start, results


@dataclass
class Timing:
    wall: float  # seconds, the best run
    frontend_cpu: float  # seconds of the API-server process's own CPU time, the least of the runs
    responses: list[dict]


def timed(
    server: ApiServer, bodies: list[dict], size: Size, repeats: int | None = None,
    warm_up: list[dict] | None = None,
) -> Timing:  # fmt: skip
    """The best wall time of `repeats` runs (after a short warm-up: the first bodies, or
    `warm_up`), the least CPU time of the API-server process itself over a run (not its
    children: the engine core is one), and the last responses."""
    import psutil

    proc = psutil.Process(server.proc.pid)

    def cpu() -> float:
        times = proc.cpu_times()
        return times.user + times.system

    warm_up = bodies[: size.clients] if warm_up is None else warm_up
    asyncio.run(run_bodies(server.url, warm_up, size.clients))
    best, least, out = float("inf"), float("inf"), []
    for _ in range(repeats or size.repeats):
        before = cpu()
        t, out = asyncio.run(run_bodies(server.url, bodies, size.clients))
        best, least = min(best, t), min(least, cpu() - before)
    return Timing(best, least, out)


def server_rows(server: ApiServer, model: str, size: Size) -> dict:
    """Wall times (rows 1, 2) and API-server CPU µs per scored position (row 6)."""
    prompts = token_prompts(model, size.prompts, size.prompt_len)
    base = {"model": "bench", "max_tokens": 1, "temperature": 0}
    bodies = {
        "plain": [dict(base, prompt=p) for p in prompts],
        "native": [dict(base, prompt=p, prompt_logprobs=0) for p in prompts],
        "ours": [dict(base, prompt=p, max_tokens=0, loglikelihood=True) for p in prompts],
        "native_top5": [dict(base, prompt=p, prompt_logprobs=5) for p in prompts],
        "ours_top5": [dict(base, prompt=p, max_tokens=0, loglikelihood={"top_logprobs": 5})
                      for p in prompts],
    }  # fmt: skip
    out: dict = {"wall": {}, "frontend_us": {}}
    positions = size.prompts * (size.prompt_len - 1)
    for name, requests in bodies.items():
        timing = timed(server, requests, size)
        out["wall"][name] = timing.wall
        out["frontend_us"][name] = timing.frontend_cpu / positions * 1e6
        if name.startswith("ours"):
            for r in timing.responses:
                (entry,) = r["choices"][0]["loglikelihood"]
                assert entry["num_tokens"] == size.prompt_len - 1 == len(entry["content"])
    return out


WORDS = [" True", " False", " None", " return", " import", " class", " def", " self"]


def questions(model: str, size: Size, count: int, seed: int = 1) -> list[tuple[list[int], list[str]]]:
    """`count` multiple-choice questions: a context of `size.context_len` tokens (BOS and
    stdlib source) and 4 continuations of about `size.continuation_len` tokens."""
    contexts = token_prompts(model, count, size.context_len, seed=seed)
    return [
        (ctx, [WORDS[(q + j) % len(WORDS)] + " x" * (size.continuation_len - 1) for j in range(4)])
        for q, ctx in enumerate(contexts)
    ]


def multiple_choice(model: str, dtype: str, size: Size) -> dict:
    """Row 4: ours at each block size, then the native baseline once; each server has prefix
    caching on, as vLLM's default. Ours runs first on a fresh server, after a warm-up on other
    contexts: the native requests store their prompts' blocks in the prefix cache too, which
    would spare ours the contexts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ours, native, expected = [], [], []
    for ctx, conts in questions(model, size, size.questions):
        ours.append({"model": "bench", "prompt": ctx, "max_tokens": 0,
                     "loglikelihood": {"continuations": conts}})  # fmt: skip
        for c in conts:
            cont = tok.encode(c, add_special_tokens=False)
            native.append({"model": "bench", "prompt": ctx + cont, "max_tokens": 1,
                           "prompt_logprobs": 0})  # fmt: skip
            expected.append(len(ctx))
    warm_up = [
        {"model": "bench", "prompt": ctx, "max_tokens": 0, "loglikelihood": {"continuations": c}}
        for ctx, c in questions(model, size, size.clients, seed=3)
    ]
    result: dict = {"ours": {}}
    worst = 0.0
    for block_size in size.block_sizes:
        with serve(model, dtype, size.context_len + 64, True, 8302, RESERVED, block_size) as server:
            ours_out = timed(server, ours, size, repeats=1, warm_up=warm_up)
            result["ours"][str(block_size)] = ours_out.wall
            if block_size == size.block_sizes[0]:
                # One run: the baseline takes minutes, long enough to average out the noise.
                native_out = timed(server, native, size, repeats=1, warm_up=[])
                result["native"] = native_out.wall
        # The two paths must give the same numbers.
        for q, response in enumerate(ours_out.responses):
            for j, entry in enumerate(response["choices"][0]["loglikelihood"]):
                plp = native_out.responses[4 * q + j]["choices"][0]["prompt_logprobs"]
                start = expected[4 * q + j]
                ref = [next(iter(d.values()))["logprob"] for d in plp[start:]]
                got = [t["logprob"] for t in entry["content"]]
                worst = max(worst, max(abs(a - b) for a, b in zip(got, ref, strict=True)))
    result["max_abs_diff"] = worst
    return result


def offline_multiple_choice(model: str, size: Size, dtype: str) -> dict:
    """Row 7: `vllm_loglik.loglikelihood` on an `LLM` with prefix caching on (vLLM's default)
    and `block_size=32`, against one native `prompt_logprobs` prompt per pair in one `generate`
    call on the same `LLM`. The prefix cache is emptied before each timed run."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm_loglik
    from vllm_loglik.offline import scorer_for

    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(
        model, dtype=dtype, max_model_len=size.context_len + 64, enforce_eager=True, seed=0,
        block_size=32,
    )  # fmt: skip
    items = questions(model, size, size.offline_questions)
    pairs = [(tok.decode(ctx[1:]), c) for ctx, conts in items for c in conts]
    scorer = scorer_for(llm)  # the same token ids in both paths
    prompts = [
        TokensPrompt(prompt_token_ids=scorer.pair(*pair).spans[0].prompt_token_ids)
        for pair in pairs
    ]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def ours() -> None:
        vllm_loglik.loglikelihood(llm, pairs)

    def native() -> None:
        llm.generate(prompts, params, use_tqdm=False)

    warm_up = [(tok.decode(ctx[1:]), c) for ctx, conts in questions(model, size, 1, seed=3) for c in conts]
    vllm_loglik.loglikelihood(llm, warm_up)  # other contexts: the cache is reset anyway
    t: dict[str, list[float]] = {"ours": [], "native": []}
    for _ in range(size.repeats):
        for name, fn in (("ours", ours), ("native", native)):
            llm.reset_prefix_cache()
            start = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in t.items()}


def batch_lines(model: str, size: Size) -> list[str]:
    """`size.batch_lines` mixed request bodies, as JSON lines: whole prompts, multiple choice,
    rolling documents longer than the context, chat last messages and chat candidates."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = token_prompts(model, 1, 40 * size.prompt_len, seed=5)[0][1:]
    longest = size.prompt_len // 2  # room for a chat template and continuations

    def text(at: int, length: int) -> str:
        at %= len(ids) - length
        return tok.decode(ids[at : at + length])

    lines = []
    for i in range(size.batch_lines):
        piece = text(i * 37, 8 + i % (longest - 8))
        kind = i % 5
        if kind == 0:
            body = {"prompt": piece, "loglikelihood": True}
        elif kind == 1:
            body = {"prompt": piece, "loglikelihood": {"continuations": WORDS[:4]}}
        elif kind == 2:
            body = {"prompt": text(i * 53, size.prompt_len * 2), "loglikelihood": {"scope": "rolling"}}
        elif kind == 3:
            body = {"messages": [{"role": "user", "content": piece}], "loglikelihood": True}
        else:
            body = {"messages": [{"role": "user", "content": piece}],
                    "loglikelihood": {"continuations": ["Yes.", "No.", piece[:40] or "Maybe."]}}  # fmt: skip
        lines.append(json.dumps(dict(body, id=i)))
    return lines


def offline_batch(model: str, size: Size, dtype: str) -> dict:
    """Row 9: `vllm-loglik score`'s engine loop (`vllm_loglik.batch.run_engine`, what the CLI
    runs once its engine is up) against the offline API's `run_jobs` called once on the same
    jobs, on one `LLM` (prefix caching on, `block_size=32`); scored tokens per second."""
    import io

    from vllm import LLM

    from vllm_loglik import batch
    from vllm_loglik.offline import run_jobs, scorer_for

    llm = LLM(
        model, dtype=dtype, max_model_len=size.prompt_len + 16, enforce_eager=True, seed=0,
        block_size=32,
    )  # fmt: skip
    lines = batch_lines(model, size)
    scorer = scorer_for(llm)
    works = [batch.parse_line(scorer, line, n, False) for n, line in enumerate(lines, start=1)]
    assert all(w.error is None for w in works), [w.error for w in works if w.error][:3]
    jobs = [job for w in works for job in w.jobs]
    run_jobs(llm, jobs[:8], 0, False)  # warm-up
    t: dict[str, list[float]] = {"tool": [], "offline": []}
    tokens = 0
    for _ in range(1):  # one run of each: minutes long, enough to average out the noise
        llm.reset_prefix_cache()
        start = time.perf_counter()
        scores = run_jobs(llm, jobs, 0, False)
        t["offline"].append(time.perf_counter() - start)
        tokens = sum(s.num_tokens for s in scores)
        llm.reset_prefix_cache()
        out = io.StringIO()
        writer = batch.OrderedWriter(out, 1)
        progress = batch.Progress(total=len(lines))
        start = time.perf_counter()
        def emit(record: dict) -> None:
            progress.update(writer.add(record), batch.scored_tokens(record))

        batch.run_engine(llm, iter(enumerate(lines, start=1)), emit, False)
        t["tool"].append(time.perf_counter() - start)
        progress.close()
        assert writer.failed == 0 and out.getvalue().count("\n") == len(lines)
    best = {k: min(v) for k, v in t.items()}
    return {"lines": len(lines), "tokens": tokens, **best,
            "tool_tok_s": tokens / best["tool"], "offline_tok_s": tokens / best["offline"]}  # fmt: skip


LM_EVAL_TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""


def lm_eval_row(model: str, dtype: str, size: Size) -> dict:
    """Row 8: lm-eval's wall time on a 4-choice task with long contexts, `vllm-loglik`
    against lm-eval's own `local-completions` (echo + logprobs, one request per pair), on the
    same server (prefix caching on, `--block-size 32`), each with `num_concurrent` = clients.
    Each is one run of the CLI, start-up included; ours runs first, after a warm-up on other
    contexts (local-completions' requests store their prompts in the prefix cache)."""
    import httpx
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    folder = ROOT / ".cache" / f"bench-lm-eval-{size.name}"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "bench_mc.jsonl"
    with open(data, "w") as f:
        for q, (ctx, conts) in enumerate(questions(model, size, size.lm_eval_questions, seed=4)):
            doc = {"question": tok.decode(ctx[1:]), "choices": conts, "answer": q % 4}
            f.write(json.dumps(doc) + "\n")
    (folder / "bench_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    cli = str(Path(sys.executable).parent / "vllm-loglik")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    with serve(model, dtype, size.context_len + 64, True, 8303, RESERVED, 32) as server:
        for ctx, conts in questions(model, size, size.clients, seed=3):
            body = {"model": "bench", "prompt": ctx, "max_tokens": 0,
                    "loglikelihood": {"continuations": conts}}  # fmt: skip
            httpx.post(server.url + "/v1/completions", json=body, timeout=600).raise_for_status()
        url = server.url + "/v1/completions"
        out: dict = {}
        for name, model_args in (
            ("ours", f"model=bench,base_url={url},num_concurrent={size.clients}"),
            ("local_completions",
             f"model=bench,base_url={url},num_concurrent={size.clients},"
             f"tokenizer_backend=huggingface,tokenizer={model},tokenized_requests=True"),
        ):  # fmt: skip
            lm = "vllm-loglik" if name == "ours" else "local-completions"
            shutil.rmtree(folder / name, ignore_errors=True)  # results of an earlier run
            cmd = [cli, "eval", "--model", lm, "--model_args", model_args, "--tasks", "bench_mc",
                   "--include_path", str(folder), "--output_path", str(folder / name)]  # fmt: skip
            start = time.perf_counter()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            out[name] = time.perf_counter() - start
            if run.returncode != 0:
                sys.exit(f"lm-eval ({lm}) failed:\n{run.stderr[-3000:]}")
            (results,) = (folder / name).rglob("results_*.json")
            out[f"{name}_acc"] = json.loads(results.read_text())["results"]["bench_mc"]["acc,none"]
    return out


LM_EVAL_ROLLING_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""

#: lm-eval's name of each side of rows 10 and 11.
IN_PROCESS_MODELS = {"ours": "vllm-loglik-offline", "vllm": "vllm"}


def lm_eval_offline_tasks(model: str, size: Size) -> Path:
    """The tasks of rows 10 and 11 and their warm-ups (other questions, another document)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    folder = ROOT / ".cache" / f"bench-lm-eval-offline-{size.name}"
    folder.mkdir(parents=True, exist_ok=True)
    text = tok.decode(token_prompts(model, 1, (size.rolling_docs + 1) * size.rolling_doc_len, 6)[0][1:])
    ids = tok.encode(text, add_special_tokens=False)
    docs = [tok.decode(ids[i * size.rolling_doc_len : (i + 1) * size.rolling_doc_len])
            for i in range(size.rolling_docs + 1)]  # fmt: skip
    for name, items, documents in (
        ("bench_offline_mc", questions(model, size, size.lm_offline_questions, seed=7), docs[1:]),
        ("bench_warm_mc", questions(model, size, 2, seed=8), docs[:1]),
    ):
        with open(folder / f"{name}.jsonl", "w") as f:
            for q, (ctx, conts) in enumerate(items):
                doc = {"question": tok.decode(ctx[1:]), "choices": conts, "answer": q % 4}
                f.write(json.dumps(doc) + "\n")
        (folder / f"{name}.yaml").write_text(
            LM_EVAL_TASK.replace("bench_mc", name).format(data=folder / f"{name}.jsonl")
        )
        rolling = name.replace("_mc", "_rolling")
        with open(folder / f"{rolling}.jsonl", "w") as f:
            for document in documents:
                f.write(json.dumps({"text": document}) + "\n")
        (folder / f"{rolling}.yaml").write_text(
            LM_EVAL_ROLLING_TASK.format(name=rolling, data=folder / f"{rolling}.jsonl")
        )
    return folder


def lm_eval_in_process(model: str, size: Size, dtype: str, side: str) -> dict:
    """One side of rows 10 and 11, in a child process: build the lm-eval model, warm it up on
    the warm-up tasks, then time `simple_evaluate` on each task."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    if side == "ours":
        import vllm_loglik.harness  # noqa: F401  (registers vllm-loglik-offline)
    folder = ROOT / ".cache" / f"bench-lm-eval-offline-{size.name}"
    args = (f"pretrained={model},dtype={dtype},max_model_len={size.context_len + 64},"
            "enforce_eager=True,block_size=32,seed=0")  # fmt: skip
    lm = get_model(IN_PROCESS_MODELS[side]).create_from_arg_string(args, {"batch_size": "auto"})
    tasks = TaskManager(include_path=str(folder))

    def evaluate(task: str) -> dict:
        return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, log_samples=True)

    evaluate("bench_warm_mc")
    evaluate("bench_warm_rolling")
    out: dict = {}
    for task in ("bench_offline_mc", "bench_offline_rolling"):
        start = time.perf_counter()
        result = evaluate(task)
        out[task] = {"seconds": time.perf_counter() - start,
                     "metrics": {k: v for k, v in result["results"][task].items()
                                 if isinstance(v, float)},
                     "loglikelihoods": [float(r[0]) if isinstance(r, (list, tuple)) else float(r)
                                        for s in result["samples"][task]
                                        for r in s["filtered_resps"]]}  # fmt: skip
    return out


def lm_eval_offline_rows(model: str, size: Size, dtype: str, smoke: bool) -> dict:
    """Rows 10 and 11: each side in a process of its own (no engine of ours beside lm-eval's),
    lm-eval's first; lm-eval's `vllm` model gets a `vllm` dist-info on the CPU build."""
    from vllm_loglik.testing import lm_eval_vllm_env

    lm_eval_offline_tasks(model, size)
    env = lm_eval_vllm_env(ROOT / ".cache" / "bench-vllm-dist")
    vllm = offline_child(smoke, size, RESERVED, "lm_vllm", env)
    ours = offline_child(smoke, size, RESERVED, "lm_ours")
    out: dict = {"vllm": vllm, "ours": ours}
    for task in ("bench_offline_mc", "bench_offline_rolling"):
        a, b = ours[task]["loglikelihoods"], vllm[task]["loglikelihoods"]
        out[f"{task}_max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return out


def peak_rss(pid: int, fn) -> tuple[float, float]:
    """Peak RSS (GiB) of `pid` and its children while `fn` runs, and the baseline before it."""
    import psutil

    proc = psutil.Process(pid)

    def rss() -> float:
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**30

    before, peak, done = rss(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return before, peak[0]


def memory_row(server: ApiServer, model: str, size: Size) -> dict:
    """Peak RSS while scoring a long prompt, against plain prefill of it; and the same growth
    at a quarter of the length, which shows whether it scales with the prompt's length."""
    import httpx

    def post(body: dict) -> None:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text[:500]

    out = {}
    for name, length in (("short", size.memory_len // 4), ("long", size.memory_len)):
        (prompt,) = token_prompts(model, 1, length, seed=2)
        plain = {"model": "bench", "prompt": prompt, "max_tokens": 1}
        ours = {"model": "bench", "prompt": prompt, "max_tokens": 0,
                "loglikelihood": {"top_logprobs": 5}}  # fmt: skip
        post(plain)
        post(ours)  # warm-up: allocator pools settle
        base_plain, peak_plain = peak_rss(server.proc.pid, lambda: post(plain))
        base_ours, peak_ours = peak_rss(server.proc.pid, lambda: post(ours))
        out[name] = {"tokens": length, "plain_peak_gib": peak_plain, "ours_peak_gib": peak_ours,
                     "plain_growth_gib": peak_plain - base_plain,
                     "ours_growth_gib": peak_ours - base_ours}  # fmt: skip
    return out


def ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (a CPU time under one 10 ms tick, in a smoke run)."""
    return a / b if b else float("nan")


def table(r: dict, size: Size) -> str:
    """The markdown table of every row whose figures `r` holds."""
    rows = []
    if "server" in r and "offline" in r:
        for reserved in size.settings:
            srv, off = r["server"][str(reserved)], r["offline"][str(reserved)]
            wall, us = srv["wall"], srv["frontend_us"]
            setting = f"{reserved} reserved"
            rows += [
                ("1. server: `loglikelihood` vs native `prompt_logprobs=0`", setting,
                 wall["ours"] / wall["native"], "≤ 0.8×",
                 f"{wall['ours']:.2f} s vs {wall['native']:.2f} s"),
                ("2. server: `loglikelihood` vs plain prefill", setting, wall["ours"] / wall["plain"],
                 "≤ 1.7×", f"{wall['ours']:.2f} s vs {wall['plain']:.2f} s"),
                ("3. offline: speed-up over transformers", setting,
                 off["transformers"] / off["ours"], "≥ 1.0×",
                 f"transformers {off['transformers']:.2f} s, ours {off['ours']:.2f} s (vLLM: native "
                 f"prompt logprobs {off['native']:.2f} s, plain prefill {off['prefill']:.2f} s)"),
                ("6. front-end CPU per position, k = 0: plugin vs native", setting,
                 ratio(us["ours"], us["native"]), "≤ 0.3×",
                 f"{us['ours']:.1f} µs vs {us['native']:.1f} µs (plain prefill {us['plain']:.1f} µs)"),
                ("6. front-end CPU per position, k = 5: plugin vs native", setting,
                 ratio(us["ours_top5"], us["native_top5"]), "≤ 0.3×",
                 f"{us['ours_top5']:.1f} µs vs {us['native_top5']:.1f} µs"),
            ]  # fmt: skip
    if "multiple_choice" in r:
        mc = r["multiple_choice"]
        for block_size, t in mc["ours"].items():
            rows.append(
                ("4. multiple choice: speed-up over one prompt per pair",
                 f"{RESERVED} reserved, block {block_size}", mc["native"] / t, "≥ 4.5×",
                 f"{mc['native']:.2f} s vs {t:.2f} s, largest difference {mc['max_abs_diff']:.1e}")
            )  # fmt: skip
    if "memory" in r:
        long, short = r["memory"]["long"], r["memory"]["short"]
        vocab_bytes = long["tokens"] * 32000 * 4 / 2**30
        rows.append(
            ("5. memory: peak RSS, scoring vs plain prefill", f"{RESERVED} reserved",
             long["ours_peak_gib"] / long["plain_peak_gib"], "no len × vocab growth",
             f"{long['tokens']} tokens: {long['ours_peak_gib']:.2f} GiB vs {long['plain_peak_gib']:.2f}"
             f" GiB, growth {long['ours_growth_gib']:.2f} vs {long['plain_growth_gib']:.2f} GiB; "
             f"{short['tokens']} tokens: growth {short['ours_growth_gib']:.2f} vs "
             f"{short['plain_growth_gib']:.2f} GiB (len × vocab × 4 B at {long['tokens']}: "
             f"{vocab_bytes:.2f} GiB)")
        )  # fmt: skip
    if "offline_multiple_choice" in r:
        omc = r["offline_multiple_choice"]
        rows.append(
            ("7. offline multiple choice: speed-up over one prompt per pair",
             f"{RESERVED} reserved, block 32", omc["native"] / omc["ours"], "≥ 4×",
             f"{omc['native']:.2f} s vs {omc['ours']:.2f} s ({size.offline_questions} questions × 4 "
             f"continuations, {size.context_len}-token contexts)")
        )  # fmt: skip
    if "lm_eval" in r:
        lm = r["lm_eval"]
        rows.append(
            ("8. lm-eval: `vllm-loglik` vs `local-completions`, same server",
             f"{RESERVED} reserved, block 32", lm["local_completions"] / lm["ours"], "≥ 3×",
             f"{lm['local_completions']:.1f} s vs {lm['ours']:.1f} s ({size.lm_eval_questions} "
             f"questions, {size.context_len}-token contexts; acc {lm['local_completions_acc']:.3f} vs "
             f"{lm['ours_acc']:.3f})")
        )  # fmt: skip
    if "batch" in r:
        b = r["batch"]
        rows.append(
            ("9. batch CLI: tokens/s vs the offline API in one call", f"{RESERVED} reserved, block 32",
             b["tool_tok_s"] / b["offline_tok_s"], "≥ 0.95×",
             f"{b['tool_tok_s']:,.0f} vs {b['offline_tok_s']:,.0f} tokens/s ({b['lines']} mixed lines, "
             f"{b['tokens']:,} scored tokens)")
        )  # fmt: skip
    if "lm_eval_offline" in r:
        lo = r["lm_eval_offline"]
        for task, number, goal, what, metric in (
            ("bench_offline_mc", 10, "≥ 4×", f"{size.lm_offline_questions} questions × 4 choices, "
             f"{size.context_len}-token contexts", "acc"),
            ("bench_offline_rolling", 11, "≥ 1.0×", f"{size.rolling_docs} documents of "
             f"{size.rolling_doc_len} tokens, windows of {size.context_len + 62}", "word_perplexity"),
        ):  # fmt: skip
            theirs, ours = lo["vllm"][task], lo["ours"][task]
            kind = "multiple choice" if number == 10 else "rolling"
            rows.append(
                (f"{number}. lm-eval in process, {kind}: `vllm-loglik-offline` vs `--model vllm`",
                 f"{RESERVED} reserved, block 32", theirs["seconds"] / ours["seconds"], goal,
                 f"{theirs['seconds']:.1f} s vs {ours['seconds']:.1f} s ({what}; {metric} "
                 f"{theirs['metrics'][metric + ',none']:.4g} vs {ours['metrics'][metric + ',none']:.4g},"
                 f" largest difference {lo[task + '_max_abs_diff']:.1e})")
            )  # fmt: skip
    if "token_responses" in r:
        rows.append(token_responses_row(r["token_responses"]))
    rows.sort(key=lambda row: int(row[0].split(".")[0]))  # by row number; settings in order
    lines = [
        "| row | CPU setting | ratio | goal | measured |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c:.2f}× | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines)


def offline_child(
    smoke: bool, size: Size, reserved: int, kind: str = "rows", env: dict | None = None
) -> dict:
    """Row 3 (`kind` "rows"), row 7 ("mc"), row 9 ("batch"), row 12 ("responses") or one side
    of rows 10 and 11 ("lm_ours", "lm_vllm") in a process of its own, so that its engine is gone before the
    next one; `env` is added to its environment."""
    out = ROOT / ".cache" / f"bench-offline-{kind}-{size.name}-{reserved}.json"
    cmd = [sys.executable, __file__, "--offline-child", kind, "--json", str(out)]
    out.unlink(missing_ok=True)
    log_path = ROOT / ".cache" / f"bench-offline-{kind}-{size.name}-{reserved}.log"
    env = dict(os.environ, **reserved_env(reserved), **(env or {}))
    with open(log_path, "w") as log:  # a file, not a pipe: vLLM's helpers outlive the child
        child = subprocess.Popen(
            cmd + (["--smoke"] if smoke else []), stdout=log, stderr=log, env=env,
            start_new_session=True,
        )  # fmt: skip
        child.wait()
        # The child skips the engine's teardown; end its engine processes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    if not out.exists():
        sys.exit(f"the offline measurement failed; see {log_path}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few prompts")
    parser.add_argument("--json", type=Path, help="where to write the figures")
    parser.add_argument("--only", help="re-run these rows (JSON keys, comma-separated)")
    parser.add_argument(
        "--offline-child", choices=["rows", "mc", "batch", "responses", "lm_ours", "lm_vllm"],
        help=argparse.SUPPRESS,
    )  # fmt: skip
    args = parser.parse_args()
    size = SMOKE if args.smoke else FULL
    cpu = cpu_info()
    # The smoke run checks numbers to 1e-4, which needs float32; its timings mean nothing.
    dtype = "float32" if args.smoke else native_dtype(cpu)
    model = build(size)

    if args.offline_child:  # runs in its own process, so its engine is gone before the server's
        kind = args.offline_child
        if kind.startswith("lm_"):
            figures = lm_eval_in_process(model, size, dtype, kind.removeprefix("lm_"))
        elif kind == "responses":
            figures = token_responses(model, size.context_len, size.responses, size.response_len,
                                      dtype, size.repeats)  # fmt: skip
        else:
            rows = {"rows": offline_rows, "mc": offline_multiple_choice, "batch": offline_batch}
            figures = rows[kind](model, size, dtype)
        args.json.write_text(json.dumps(figures))
        sys.stdout.flush()
        os._exit(0)  # skip the engine's teardown, which can abort the process at exit

    out = args.json or (ROOT / "bench" / ("latest.json" if size.name == "full" else "smoke.json"))
    keys = ["offline", "server", "multiple_choice", "offline_multiple_choice", "batch",
            "lm_eval", "lm_eval_offline", "token_responses"]  # fmt: skip
    only = keys if args.only is None else args.only.split(",")
    if set(only) - set(keys):
        sys.exit(f"--only takes {', '.join(keys)}")
    results: dict = json.loads(out.read_text()) if args.only and out.exists() else {}
    results["size"] = size.name
    # Where and in which dtype each row was measured (rows measured before this was recorded
    # keep no entry).
    where = results.setdefault("measured_on", {})
    for key in only:
        where[key] = {"cpu": cpu, "dtype": dtype}
    if "offline" in only:
        results["offline"] = {
            str(reserved): offline_child(args.smoke, size, reserved) for reserved in size.settings
        }
    if "server" in only:
        results["server"] = {}
        for reserved in size.settings:
            max_len = max(size.memory_len, size.prompt_len) + 16
            with serve(model, dtype, max_len, False, 8301, reserved) as server:
                results["server"][str(reserved)] = server_rows(server, model, size)
                if reserved == RESERVED:
                    results["memory"] = memory_row(server, model, size)
    if "multiple_choice" in only:
        results["multiple_choice"] = multiple_choice(model, dtype, size)
    if "offline_multiple_choice" in only:
        results["offline_multiple_choice"] = offline_child(args.smoke, size, RESERVED, "mc")
    if "batch" in only:
        results["batch"] = offline_child(args.smoke, size, RESERVED, "batch")
    if "lm_eval" in only:
        results["lm_eval"] = lm_eval_row(model, dtype, size)
    if "lm_eval_offline" in only:
        results["lm_eval_offline"] = lm_eval_offline_rows(model, size, dtype, args.smoke)
    if "token_responses" in only:
        results["token_responses"] = offline_child(args.smoke, size, RESERVED, "responses")

    text = table(results, size)
    results["table"] = text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if out == ROOT / "bench" / "latest.json":
        write_docs_table(text)
    print(text)
    print(f"\nfigures written to {out}")
    # In float32 (the smoke run) the two paths must agree to 1e-4, as the tests require; in
    # bf16 batch composition changes rounding, so the figure is reported, not checked.
    if dtype == "float32" and "multiple_choice" in only:
        if results["multiple_choice"]["max_abs_diff"] > 1e-4:
            sys.exit("FAIL: the multiple-choice path disagrees with per-pair scoring")
    if dtype == "float32" and "token_responses" in only:
        if results["token_responses"]["max_abs_diff"] > 1e-4:
            sys.exit("FAIL: token-id responses disagree with native prompt_logprobs")
    if dtype == "float32" and "lm_eval_offline" in only:
        lo = results["lm_eval_offline"]
        if max(lo["bench_offline_mc_max_abs_diff"], lo["bench_offline_rolling_max_abs_diff"]) > 1e-4:
            sys.exit("FAIL: vllm-loglik-offline disagrees with lm-eval's vllm model")


if __name__ == "__main__":
    main()

"""Rows 1, 2, 4, 5, 6 and 16: the server against vLLM's native path and plain prefill.

1. the `loglikelihood` field against vLLM's native `prompt_logprobs=0`, same server (prefix
   caching off, so echo acceleration, which would answer the native requests too, is off);
2. the `loglikelihood` field against plain prefill (`max_tokens=1`, no logprobs);
4. multiple choice: one request per question (4 continuations) against each (context,
   continuation) as its own native prompt-logprobs request, as lm-eval's vLLM backend does, to
   a plain vLLM server;
5. memory: peak RSS of the server's process tree while scoring one 8,000-token prompt with
   `top_logprobs=5`, against plain prefill of the same prompt;
6. front-end: the API-server process's own CPU time per scored position (psutil; the engine
   core is a process of its own), the plugin against native `prompt_logprobs`, at k = 0 and 5;
16. words: corrected word scores of long documents against token scores of the same documents,
   on the same server.
"""

from __future__ import annotations

import threading
import time

from common import (
    RESERVED,
    ROOT,
    ApiServer,
    Size,
    questions,
    ratio,
    reserved_env,
    serve,
    timed,
    token_prompts,
)

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

def words_row(model: str, dtype: str, size: Size) -> dict:
    """Row 16: corrected word scores of long documents (token ids, `scope: rolling`, several
    windows each) against the token scores of the same documents, on the same server, compact
    responses; each side warmed up the same way, best of `size.repeats`."""
    docs = token_prompts(model, size.rolling_docs, size.rolling_doc_len)
    window = min(2048, size.rolling_doc_len // 2)
    base = {"model": "bench", "max_tokens": 0}
    bodies = {
        "tokens": [dict(base, prompt=d, loglikelihood={"scope": "rolling", "content": False})
                   for d in docs],
        "words": [dict(base, prompt=d, loglikelihood={"scope": "rolling", "content": False,
                                                      "words": True}) for d in docs],
    }  # fmt: skip
    out: dict = {"docs": len(docs), "doc_tokens": size.rolling_doc_len, "window": window}
    with serve(model, dtype, window, False, 8302, RESERVED) as server:
        for name, requests in bodies.items():
            timing = timed(server, requests, size)
            out[name] = timing.wall
            for r in timing.responses:
                (entry,) = r["choices"][0]["loglikelihood"]
                assert entry["num_tokens"] == size.rolling_doc_len
                assert (name == "words") == ("words" in entry)
        out["words_per_doc"] = len(entry["words"])
    return out


def multiple_choice(model: str, dtype: str, size: Size) -> dict:
    """Row 4: the native baseline once, on a plain vLLM server, then ours at each block size,
    each on a fresh server with the plugin (so that no prefix cache is shared), after a warm-up
    on other contexts; every server has prefix caching on, as vLLM's default."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def bodies(qs: list[tuple[list[int], list[str]]]) -> tuple[list[dict], list[dict]]:
        """Ours (one request per question) and the native requests (one per pair)."""
        ours, native = [], []
        for ctx, conts in qs:
            ours.append({"model": "bench", "prompt": ctx, "max_tokens": 0,
                         "loglikelihood": {"continuations": conts}})  # fmt: skip
            for c in conts:
                cont = tok.encode(c, add_special_tokens=False)
                native.append({"model": "bench", "prompt": ctx + cont, "max_tokens": 1,
                               "prompt_logprobs": 0})  # fmt: skip
        return ours, native

    qs = questions(model, size, size.questions)
    ours, native = bodies(qs)
    expected = [len(ctx) for ctx, conts in qs for _ in conts]
    # Both sides warm up on the same other questions, each in its own form.
    warm_up, native_warm_up = bodies(questions(model, size, size.clients, seed=3))
    result: dict = {"ours": {}}
    worst = 0.0
    # The baseline on plain vLLM (no plugin: on the plugin's server echo acceleration would
    # answer these `prompt_logprobs` requests too), alone. One run: it takes minutes, long
    # enough to average out the noise.
    with serve(model, dtype, size.context_len + 64, True, 8302, RESERVED, size.block_sizes[0],
               plugin=False) as server:  # fmt: skip
        native_out = timed(server, native, size, repeats=1, warm_up=native_warm_up)
        result["native"] = native_out.wall
    for block_size in size.block_sizes:
        with serve(model, dtype, size.context_len + 64, True, 8302, RESERVED, block_size) as server:
            ours_out = timed(server, ours, size, repeats=1, warm_up=warm_up)
            result["ours"][str(block_size)] = ours_out.wall
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

def memory_row(server: ApiServer, model: str | None, size: Size) -> dict:
    """Peak RSS while scoring a long prompt, against plain prefill of it; and the same growth
    at a quarter of the length, which shows whether it scales with the prompt's length."""
    import httpx

    def post(body: dict) -> None:
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text[:500]

    out = {}
    for name, length in (("short", size.memory_len // 4), ("long", size.memory_len)):
        if model is None:  # a model without a transformers tokenizer: ids of ordinary tokens
            prompt = [1] + [1000 + (i * 7919) % 100_000 for i in range(length - 1)]
        else:
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


#: The bench model's shape around Tekken's 131,072-token vocabulary (row 5b).
LARGE_VOCAB_SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12)  # fmt: skip


def memory_large_vocab(size: Size, dtype: str) -> dict:
    """Row 5 on a model with a 131,072-token vocabulary (Tekken, `tokenizer_mode=mistral`,
    the bench model's body): where vLLM's own path would hold len × vocab float32 values, the
    target-only path holds a slice of rows at a time."""
    from vllm_loglik.testing import build_tekken_model

    shape = LARGE_VOCAB_SHAPE if size.name == "full" else None  # smoke: the test models' shape
    model = str(build_tekken_model(ROOT / ".cache" / f"bench-tekken-model-{size.name}", shape,
                                   size.memory_len + 64))  # fmt: skip
    args = ["--served-model-name", "bench", "--dtype", dtype, "--max-model-len",
            str(size.memory_len + 16), "--enforce-eager", "--seed", "0", "--max-logprobs", "20",
            "--no-enable-prefix-caching", "--tokenizer-mode", "mistral"]  # fmt: skip
    log = ROOT / ".cache" / "bench-server-large-vocab.log"
    with ApiServer(model, args, log, port=8304, timeout=900, env=reserved_env(RESERVED)) as server:
        out = memory_row(server, None, size)
    return dict(out, vocab=131072)


def table_rows(r: dict, size: Size) -> list[tuple[str, str, float, str, str]]:
    rows = []
    for reserved in size.settings if "server" in r else ():
        srv = r["server"][str(reserved)]
        wall, us = srv["wall"], srv["frontend_us"]
        setting = f"{reserved} reserved"
        rows += [
            ("1. server: `loglikelihood` vs native `prompt_logprobs=0`", setting,
             wall["ours"] / wall["native"], "≤ 0.8×",
             f"{wall['ours']:.2f} s vs {wall['native']:.2f} s"),
            ("2. server: `loglikelihood` vs plain prefill", setting, wall["ours"] / wall["plain"],
             "≤ 1.6×", f"{wall['ours']:.2f} s vs {wall['plain']:.2f} s"),
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
    if "words" in r:
        w = r["words"]
        rows.append(
            ("16. words: corrected word scores vs token scores, same server", f"{RESERVED} reserved",
             w["words"] / w["tokens"], "≤ 1.1×",
             f"{w['docs']} documents of {w['doc_tokens']} tokens ({w['words_per_doc']} words each) "
             f"in {w['window']}-token windows: {w['words']:.2f} s vs {w['tokens']:.2f} s")
        )  # fmt: skip
    for key in ("memory", "memory_large_vocab"):
        if key not in r:
            continue
        long, short = r[key]["long"], r[key]["short"]
        vocab = r[key].get("vocab", 32000)
        vocab_bytes = long["tokens"] * vocab * 4 / 2**30
        rows.append(
            ("5. memory: peak RSS, scoring vs plain prefill", f"{RESERVED} reserved",
             long["ours_peak_gib"] / long["plain_peak_gib"], "no len × vocab growth",
             f"{long['tokens']} tokens, {vocab:,}-token vocabulary: {long['ours_peak_gib']:.2f} GiB "
             f"vs {long['plain_peak_gib']:.2f} GiB, growth {long['ours_growth_gib']:.2f} vs "
             f"{long['plain_growth_gib']:.2f} GiB; {short['tokens']} tokens: growth "
             f"{short['ours_growth_gib']:.2f} vs {short['plain_growth_gib']:.2f} GiB (len × vocab × 4 B "
             f"at {long['tokens']}: {vocab_bytes:.2f} GiB)")
        )  # fmt: skip
    return rows

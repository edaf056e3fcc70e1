"""Rows 18 and 19: teacher logprobs in TRL's shapes, against what TRL sends today.

TRL's newest client (`VLLMClient.get_sequence_logprobs`) posts each batch of sequences to plain
vLLM's `/v1/completions` as token-id prompts with `prompt_logprobs=k` and `max_tokens=1`, and
slices the completion rows out on its side: vLLM computes and ships top-k logprobs for every
prompt position, and reads no prefix cache. Against it, on the same server (prefix caching on,
vLLM's default; KV blocks of 32), `top_logprobs` 20, one request per prompt group (a GRPO group:
one prompt, 8 sampled completions) from 4 concurrent clients:

* our `/get_sequence_logprobs/` (`vllm_loglik.server.teacher`), `response_format` `json` and
  `binary`: each group's prompt computed once, the completion rows only;

18. a long shared prompt: 16 prompts of 1,000 tokens, 8 completions of 250 each (plain vLLM
    computes 10,000 positions per group, the floor is 3,000): goal at least 3x;
19. long completions: 16 prompts of 200 tokens, 8 completions of 1,000 each: no slower than
    plain vLLM, and the binary answer at least 10x smaller than plain vLLM's JSON.

Both sides are warmed up on other sequences, and the prefix cache is emptied before each timed
run (`/reset_prefix_cache` needs `VLLM_SERVER_DEV_MODE`; the groups are otherwise new to the
cache, as each timed run uses sequences of its own). The numbers of the two must agree (the
actual tokens' logprobs, 1e-4 in float32).
"""

from __future__ import annotations

import asyncio
import random
import time

from common import RESERVED, Size, serve

K = 20
#: (row, prompts, prompt tokens, completions per prompt, completion tokens)
SHAPES = {
    "shared_prompt": (18, 16, 1000, 8, 250),
    "long_completions": (19, 16, 200, 8, 1000),
}
SMOKE_SHAPES = {
    "shared_prompt": (18, 2, 60, 3, 10),
    "long_completions": (19, 2, 10, 3, 40),
}


def groups(vocab: int, prompts: int, plen: int, n: int, clen: int, seed: int) -> list[list[list[int]]]:
    """`prompts` groups of `n` sequences: one random prompt, `n` random completions."""
    rng = random.Random(seed)
    out = []
    for _ in range(prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(plen)]
        out.append([prompt + [rng.randrange(3, vocab) for _ in range(clen)] for _ in range(n)])
    return out


def bodies(kind: str, grouped: list[list[list[int]]], plen: int) -> list[tuple[str, dict]]:
    if kind == "plain":
        return [("/v1/completions", {"model": "bench", "prompt": g, "max_tokens": 1,
                                     "temperature": 1.0, "prompt_logprobs": K}) for g in grouped]  # fmt: skip
    return [
        ("/get_sequence_logprobs/", {"sequences": g, "prompt_lengths": [plen] * len(g),
                                     "top_logprobs": K, "response_format": kind})
        for g in grouped
    ]  # fmt: skip


async def run(url: str, requests: list[tuple[str, dict]], clients: int) -> tuple[float, list[bytes]]:
    import httpx

    results: list[bytes] = [b""] * len(requests)
    queue = list(enumerate(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i, (path, body) = queue.pop(0)
            r = await client.post(url + path, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text[:500]}")
            results[i] = r.content

    async with httpx.AsyncClient(timeout=3600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - start, results


def actual_logprobs(kind: str, raw: list[bytes], grouped, plen: int) -> list[list[float]]:
    """The actual tokens' logprobs of every completion row, from either answer."""
    import json

    from vllm_loglik.teacher import decode_binary

    out = []
    for body, group in zip(raw, grouped, strict=True):
        data = json.loads(body)
        if kind == "plain":
            for choice, seq in zip(data["choices"], group, strict=True):
                rows = choice["prompt_logprobs"][plen:]
                out.append([row[str(t)]["logprob"] for row, t in zip(rows, seq[plen:], strict=True)])
        elif kind == "binary":
            a = decode_binary(data)
            for i, n in enumerate(a["completion_lengths"]):
                out.append(a["actual_logprobs"][i, :n, 0].tolist())
        else:
            for i, seq in enumerate(group):
                out.append([
                    lps[ids.index(t)]
                    for lps, ids, t in zip(data["logprobs"][i], data["logprob_token_ids"][i], seq[plen:], strict=True)
                ])  # fmt: skip
    return out


def teacher_rows(model: str, dtype: str, size: Size) -> dict:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model))
    shapes = SMOKE_SHAPES if size.name == "smoke" else SHAPES
    longest = max(p + c for _, _, p, _, c in shapes.values())
    out: dict = {}
    env_dev = {"VLLM_SERVER_DEV_MODE": "1"}
    with serve(model, dtype, longest + 16, True, 8305, RESERVED, 32, env=env_dev) as server:
        for name, (_, prompts, plen, n, clen) in shapes.items():
            import httpx

            figures: dict = {"prompts": prompts, "prompt_len": plen, "n": n, "completion_len": clen}
            warm = groups(vocab, size.clients, plen, n, clen, seed=99)
            answers = {}
            for kind in ("plain", "json", "binary"):
                asyncio.run(run(server.url, bodies(kind, warm, plen), size.clients))
            best = {kind: float("inf") for kind in ("plain", "json", "binary")}
            for rep in range(size.repeats):
                grouped = groups(vocab, prompts, plen, n, clen, seed=rep)
                for kind in ("plain", "json", "binary"):
                    httpx.post(server.url + "/reset_prefix_cache", timeout=60).raise_for_status()
                    t, raw = asyncio.run(run(server.url, bodies(kind, grouped, plen), size.clients))
                    best[kind] = min(best[kind], t)
                    answers[kind] = (raw, grouped)
            figures.update({f"{k}_seconds": v for k, v in best.items()})
            figures.update({f"{k}_bytes": sum(len(b) for b in answers[k][0]) for k in answers})
            plain = actual_logprobs("plain", answers["plain"][0], answers["plain"][1], plen)
            worst = 0.0
            for kind in ("json", "binary"):
                ours = actual_logprobs(kind, answers[kind][0], answers[kind][1], plen)
                for a, b in zip(plain, ours, strict=True):
                    worst = max([worst, *(abs(x - y) for x, y in zip(a, b, strict=True))])
            figures["max_abs_diff"] = worst
            out[name] = figures
    return out


def table_rows(results: dict, size: object) -> list[tuple[str, str, float, str, str]]:
    if "teacher" not in results:
        return []
    rows = []
    for name, goal in (("shared_prompt", "≥ 3×"), ("long_completions", "≥ 1×, answer ≥ 10× smaller")):
        f = results["teacher"][name]
        number = SHAPES[name][0]
        what = (f"{f['prompts']} prompts of {f['prompt_len']} tokens × {f['n']} completions of "
                f"{f['completion_len']}, top-{K}")  # fmt: skip
        for kind in ("json", "binary"):
            rows.append((
                f"{number}. TRL's teacher request: `/get_sequence_logprobs/` ({kind}) vs plain "
                "vLLM `prompt_logprobs`",
                f"{RESERVED} reserved, block 32", f["plain_seconds"] / f[f"{kind}_seconds"], goal,
                f"{f['plain_seconds']:.1f} s vs {f[f'{kind}_seconds']:.1f} s ({what}; answers "
                f"{f['plain_bytes'] / 2**20:.1f} MiB vs {f[f'{kind}_bytes'] / 2**20:.1f} MiB, "
                f"{f['plain_bytes'] / f[f'{kind}_bytes']:.0f}× smaller; largest difference "
                f"{f['max_abs_diff']:.1e})",
            ))  # fmt: skip
    return rows

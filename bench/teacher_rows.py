"""Rows 18-20: teacher logprobs in TRL's shapes, against what TRL sends today.

TRL's newest client (`VLLMClient.get_sequence_logprobs`) posts each batch of sequences to plain
vLLM's `/v1/completions` as token-id prompts with `prompt_logprobs=k` and `max_tokens=1`, and
slices the completion rows out on its side: vLLM computes and ships top-k logprobs for every
prompt position, and reads no prefix cache. The baseline is that body on a plain vLLM
server (prefix caching on, vLLM's default; KV blocks of 32), `top_logprobs` 20, one request per
prompt group (a GRPO group: one prompt, 8 sampled completions) from 4 concurrent clients.
Against it, on the plugin's server with the same settings:

* our `/get_sequence_logprobs/` (`vllm_loglik.server.teacher`), `response_format` `json` and
  `binary`: each group's prompt computed once, the completion rows only;
* TRL 1.16's body itself, which echo acceleration (`vllm_loglik.server.echo`) answers with
  plain vLLM's answer, each group's prompt computed once (row 20: kept only if it pays);

18. a long shared prompt: 16 prompts of 1,000 tokens, 8 completions of 250 each (plain vLLM
    computes 10,000 positions per group, the floor is 3,000): goal at least 3x;
19. long completions: 16 prompts of 200 tokens, 8 completions of 1,000 each: no slower than
    plain vLLM, and the binary answer at least 10x smaller than plain vLLM's JSON (bytes on
    the wire: our route gzips a long answer for a client that accepts it, as httpx and TRL's
    client do);
20. TRL 1.16's own body on the plugin's server, on both shapes.

Every side is warmed up on the same two other groups, then timed once (the baseline takes
minutes), with the prefix cache emptied first (`/reset_prefix_cache`, under
`VLLM_SERVER_DEV_MODE`). Every side's numbers must agree with the baseline's (the actual
tokens' logprobs; 1e-4 in float32).
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
    """One request per group: `plain` and `trl` are TRL 1.16's body (plain vLLM's answer, and
    the plugin's server accelerating it), `json` and `binary` our route's."""
    if kind in ("plain", "trl"):
        return [("/v1/completions", {"model": "bench", "prompt": g, "max_tokens": 1,
                                     "temperature": 1.0, "prompt_logprobs": K}) for g in grouped]  # fmt: skip
    return [
        ("/get_sequence_logprobs/", {"sequences": g, "prompt_lengths": [plen] * len(g),
                                     "top_logprobs": K, "response_format": kind})
        for g in grouped
    ]  # fmt: skip


async def run(url: str, requests: list[tuple[str, dict]], clients: int) -> tuple[float, list[bytes], int]:
    """Wall time, the answers, and the bytes they took on the wire."""
    import httpx

    results: list[bytes] = [b""] * len(requests)
    wire: list[int] = [0] * len(requests)
    queue = list(enumerate(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i, (path, body) = queue.pop(0)
            r = await client.post(url + path, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text[:500]}")
            results[i] = r.content
            wire[i] = r.num_bytes_downloaded  # as sent: gzipped where the server gzips

    async with httpx.AsyncClient(timeout=3600) as client:  # accepts gzip, as TRL's client does
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        return time.perf_counter() - start, results, sum(wire)


def actual_logprobs(kind: str, raw: list[bytes], grouped, plen: int) -> list[list[float]]:
    """The actual tokens' logprobs of every completion row, from either answer."""
    import json

    from vllm_loglik.teacher import decode_binary

    out = []
    for body, group in zip(raw, grouped, strict=True):
        data = json.loads(body)
        if kind in ("plain", "trl"):
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


KINDS = ("json", "binary", "trl")


def teacher_rows(model: str, dtype: str, size: Size) -> dict:
    """Ours on the plugin's server, then the baseline on a plain vLLM server (no engine of ours
    beside it), each timed once per shape after the same warm-up."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(model))
    shapes = SMOKE_SHAPES if size.name == "smoke" else SHAPES
    longest = max(p + c for _, _, p, _, c in shapes.values())
    out: dict = {
        name: {"prompts": prompts, "prompt_len": plen, "n": n, "completion_len": clen}
        for name, (_, prompts, plen, n, clen) in shapes.items()
    }
    answers: dict = {name: {} for name in shapes}
    dev = {"VLLM_SERVER_DEV_MODE": "1"}  # /reset_prefix_cache
    for plugin, kinds in ((True, KINDS), (False, ("plain",))):
        with serve(model, dtype, longest + 16, True, 8305, RESERVED, 32, plugin, dev) as server:
            for name, (_, prompts, plen, n, clen) in shapes.items():
                warm = groups(vocab, 2, plen, n, clen, seed=99)
                grouped = groups(vocab, prompts, plen, n, clen, seed=0)
                for kind in kinds:
                    asyncio.run(run(server.url, bodies(kind, warm, plen), size.clients))
                for kind in kinds:
                    import httpx

                    httpx.post(server.url + "/reset_prefix_cache", timeout=60).raise_for_status()
                    # One run: the baseline takes minutes, long enough to average out the noise.
                    t, raw, wire = asyncio.run(run(server.url, bodies(kind, grouped, plen), size.clients))
                    out[name][f"{kind}_seconds"] = t
                    out[name][f"{kind}_bytes"] = wire
                    answers[name][kind] = actual_logprobs(kind, raw, grouped, plen)
    for name in shapes:
        plain = answers[name]["plain"]
        worst = 0.0
        for kind in KINDS:
            for a, b in zip(plain, answers[name][kind], strict=True):
                worst = max([worst, *(abs(x - y) for x, y in zip(a, b, strict=True))])
        out[name]["max_abs_diff"] = worst
    return out


def table_rows(results: dict, size: object) -> list[tuple[str, str, float, str, str]]:
    if "teacher" not in results:
        return []
    rows = []
    for name, goal in (("shared_prompt", "≥ 3×"), ("long_completions", "≥ 1×, answer ≥ 10× smaller")):
        f = results["teacher"][name]
        number = SHAPES[name][0]
        what = (f"{f['prompts']} prompts of {f['prompt_len']} tokens × {f['n']} completions of "
                f"{f['completion_len']}, top-{K}; largest difference {f['max_abs_diff']:.1e}")  # fmt: skip
        for kind in ("json", "binary"):
            rows.append((
                f"{number}. TRL's teacher request: `/get_sequence_logprobs/` ({kind}) vs plain "
                "vLLM `prompt_logprobs`",
                f"{RESERVED} reserved, block 32", f["plain_seconds"] / f[f"{kind}_seconds"], goal,
                f"{f['plain_seconds']:.1f} s vs {f[f'{kind}_seconds']:.1f} s ({what}; answers "
                f"{f['plain_bytes'] / 2**20:.1f} MiB vs {f[f'{kind}_bytes'] / 2**20:.2f} MiB, "
                f"{f['plain_bytes'] / f[f'{kind}_bytes']:.0f}× smaller)",
            ))  # fmt: skip
    for name in ("shared_prompt", "long_completions"):
        f = results["teacher"][name]
        rows.append((
            f"20. TRL 1.16's client body (`prompt_logprobs`): plugin's server vs plain vLLM, "
            f"{name.replace('_', ' ')}",
            f"{RESERVED} reserved, block 32", f["plain_seconds"] / f["trl_seconds"], "> 1× (kept if it pays)",
            f"{f['plain_seconds']:.1f} s vs {f['trl_seconds']:.1f} s (row {SHAPES[name][0]}'s "
            f"sequences; the same answer, largest difference {f['max_abs_diff']:.1e})",
        ))  # fmt: skip
    return rows

"""What the bench's rows share: the sizes, the model, the CPU and its native dtype, prompts,
servers, timing, and running a row in a process of its own.

Each family of rows is a module of its own (`server_rows.py`, `offline_rows.py`,
`batch_rows.py`, `lm_eval_rows.py`, `token_responses.py`), with the code of its rows and the
lines of the table that they print; `run.py` runs them and prints the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vllm_loglik.testing import ApiServer  # noqa: E402

#: The script that runs every row, and (with `--offline-child`) one row in a child process.
RUN = ROOT / "bench" / "run.py"

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
    mmlu_len: int = 130  # row 13: tokens of a question; six of them (5 shots) fill a context
    responses: int = 16  # row 12: responses of `response_len` tokens to one `context_len` prompt
    response_len: int = 200

#: The setting of `VLLM_CPU_NUM_OF_RESERVED_CPU` that rows 4 and 5 use.
RESERVED = 0

# Full: vLLM's CPU default of 1 reserved core, and 0; the CPU default KV block of 128 tokens,
# and 32, the smallest that the CPU attention takes. Smoke: one of each, to stay quick.
FULL = Size("full", 32, 512, 64, 1000, 5, 8000, 2, (1, 0), (128, 32))

SMOKE = Size("smoke", 4, 64, 3, 300, 5, 400, 1, (RESERVED,), (32,), 2, 3, 25, 3, 2, 300,
             mmlu_len=30, responses=4, response_len=20)

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

def reserved_env(reserved: int) -> dict[str, str]:
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)}

def serve(
    model: str, dtype: str, max_model_len: int, caching: bool, port: int, reserved: int,
    block_size: int | None = None, plugin: bool = True, env: dict | None = None,
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
    return ApiServer(
        model, args, log, port=port, timeout=600, env={**reserved_env(reserved), **(env or {})},
        plugin=plugin,
    )  # fmt: skip

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

WORDS = [" True", " False", " None", " return", " import", " class", " def", " self"]

def questions(model: str, size: Size, count: int, seed: int = 1) -> list[tuple[list[int], list[str]]]:
    """`count` multiple-choice questions: a context of `size.context_len` tokens (BOS and
    stdlib source) and 4 continuations of about `size.continuation_len` tokens."""
    contexts = token_prompts(model, count, size.context_len, seed=seed)
    return [
        (ctx, [WORDS[(q + j) % len(WORDS)] + " x" * (size.continuation_len - 1) for j in range(4)])
        for q, ctx in enumerate(contexts)
    ]

def ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (a CPU time under one 10 ms tick, in a smoke run)."""
    return a / b if b else float("nan")

def offline_child(
    smoke: bool, size: Size, reserved: int, kind: str = "rows", env: dict | None = None
) -> dict:
    """Row 3 (`kind` "rows"), row 7 ("mc"), row 9 ("batch"), row 12 ("responses") or one side
    of rows 10 and 11 ("lm_ours", "lm_vllm") in a process of its own, so that its engine is gone before the
    next one; `env` is added to its environment."""
    out = ROOT / ".cache" / f"bench-offline-{kind}-{size.name}-{reserved}.json"
    cmd = [sys.executable, str(RUN), "--offline-child", kind, "--json", str(out)]
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

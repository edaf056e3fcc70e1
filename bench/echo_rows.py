"""Rows 14 and 15: lm-eval's own `local-completions` (echo scoring, one request per pair),
against the plugin's server (echo acceleration, `vllm_loglik/server/echo.py`) and against plain
vLLM (the same `vllm serve` without the plugin).

14. the 4-choice task with 1,000-token contexts of row 10;
15. the 5-shot MMLU-shaped task of row 13.

Each side is a server of its own, started after the other has stopped (no engine beside the
baseline), with the same arguments (prefix caching on, `--block-size 32`). lm-eval's
`local-completions` model is built in this process (its defaults: token-id prompts,
`max_tokens: 1`, `logprobs: 1`, `echo: true`, `temperature: 0`, one pair per request;
`num_concurrent` requests in flight), warmed up on each task's warm-up questions, and
`simple_evaluate` is timed per task. The samples' loglikelihoods must agree (float32 in the
smoke run: 1e-4; in bf16 the batch composition changes rounding, so the figure is reported).
"""

from __future__ import annotations

import time
from pathlib import Path

from common import RESERVED, Size, serve
from lm_eval_rows import lm_eval_offline_tasks

#: The timed tasks, and each one's warm-up.
TASKS = {"bench_offline_mc": "bench_warm_mc", "bench_offline_mmlu": "bench_warm_mmlu"}


def local_completions(url: str, model: str, size: Size, folder: Path) -> dict:
    """Warm up, then time lm-eval's `local-completions` against the server at `url`, on the
    tasks in `folder`."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    args = (f"model=bench,base_url={url}/v1/completions,num_concurrent={size.clients},"
            f"max_retries=1,tokenizer_backend=huggingface,tokenizer={model}")  # fmt: skip
    lm = get_model("local-completions").create_from_arg_string(args, {})
    tasks = TaskManager(include_path=str(folder))

    def evaluate(task: str) -> dict:
        return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, log_samples=True)

    for warm in TASKS.values():
        evaluate(warm)
    out: dict = {}
    for task in TASKS:
        start = time.perf_counter()
        result = evaluate(task)
        out[task] = {"seconds": time.perf_counter() - start,
                     "acc": result["results"][task]["acc,none"],
                     "loglikelihoods": [float(r[0]) for s in result["samples"][task]
                                        for r in s["filtered_resps"]]}  # fmt: skip
    return out


def echo_rows(model: str, size: Size, dtype: str) -> dict:
    """Rows 14 and 15: plain vLLM first, then the plugin's server."""
    import httpx

    folder = lm_eval_offline_tasks(model, size)
    out: dict = {}
    for side, plugin in (("vllm", False), ("ours", True)):
        with serve(model, dtype, size.context_len + 64, True, 8305, RESERVED, 32, plugin) as server:
            out[side] = local_completions(server.url, model, size, folder)
            if plugin:
                metrics = httpx.get(server.url + "/metrics").text
                out["shared_tokens"] = sum(
                    float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("vllm_loglik:echo_shared_tokens_total")
                )  # fmt: skip
    for task in TASKS:
        a, b = out["ours"][task]["loglikelihoods"], out["vllm"][task]["loglikelihoods"]
        out[f"{task}_max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return out


def table_rows(r: dict, size: Size) -> list[tuple[str, str, float, str, str]]:
    if "echo" not in r:
        return []
    e = r["echo"]
    rows = []
    for task, number, what in (
        ("bench_offline_mc", 14, f"{size.lm_offline_questions} questions × 4 choices, "
         f"{size.context_len}-token contexts"),
        ("bench_offline_mmlu", 15, f"5-shot MMLU-shaped, {size.lm_offline_questions} questions × "
         f"letters A-D, about {6 * size.mmlu_len} tokens each"),
    ):  # fmt: skip
        theirs, ours = e["vllm"][task], e["ours"][task]
        rows.append(
            (f"{number}. lm-eval `local-completions`: plugin's server vs plain vLLM",
             f"{RESERVED} reserved, block 32", theirs["seconds"] / ours["seconds"], "≥ 3×",
             f"{theirs['seconds']:.1f} s vs {ours['seconds']:.1f} s ({what}; acc "
             f"{theirs['acc']:.3f} vs {ours['acc']:.3f}, largest difference "
             f"{e[task + '_max_abs_diff']:.1e})")
        )  # fmt: skip
    return rows

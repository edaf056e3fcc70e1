"""Running lm-evaluation-harness's CLI in the tests, and reading what it logged."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "lm_eval"
CLI = str(Path(sys.executable).parent / "vllm-loglik")
#: lm-eval's own CLI, for its own models (`vllm-loglik eval` runs it too, with ours registered).
LM_EVAL = [str(Path(sys.executable).parent / "lm_eval")]


def lm_eval(
    args: list[str], out: Path, env: dict[str, str] | None = None, log: bool = False
) -> tuple:
    """Run `vllm-loglik eval ARGS` (lm-eval's CLI) from the repository's root, as the README
    does; return the results and the logged samples per task (and, with `log`, the run's
    output). `--model vllm` runs as `lm_eval` itself, with `env` added to the environment."""
    env = dict(
        os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY=API_KEY,
        TOKENIZERS_PARALLELISM="false", **(env or {}),
    )  # fmt: skip
    cli = LM_EVAL if args[:2] == ["--model", "vllm"] else [CLI, "eval"]
    cmd = [
        *cli, *args, "--include_path", str(TASKS), "--log_samples",
        "--output_path", str(out), "--seed", "0", "--device", "cpu",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-6000:])
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted(
            (json.loads(line) for line in path.read_text().splitlines()),
            key=lambda s: s["doc_id"],
        )
    results = json.loads(results_file.read_text())["results"]
    if log:
        return results, samples, run.stdout + run.stderr
    return results, samples


def side_by_side(*calls: Callable[[], Any]) -> list[Any]:
    """The results of `calls` (lm-eval runs), run at once: each run is mostly single-threaded
    start-up."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def loglikelihoods(sample: dict) -> list[float]:
    """The loglikelihood of each request of a sample (a choice, or the rolling text)."""
    out = []
    for resp in sample["filtered_resps"]:
        value = resp[0] if isinstance(resp, (list, tuple)) else resp
        out.append(float(value))
    return out


def greedy(sample: dict) -> list[bool]:
    return [str(resp[1]) == "True" for resp in sample["filtered_resps"]]


def assert_same(
    ours: dict[str, list[dict]], ref: dict[str, list[dict]], task: str, chat: bool = False
) -> None:
    assert len(ours[task]) == len(ref[task]) > 0
    for a, b in zip(ours[task], ref[task], strict=True):
        assert a["doc_id"] == b["doc_id"]
        if chat:  # the conversation as JSON for the server, rendered by hf: same continuations
            args = [[arg["arg_1"] for arg in s["arguments"].values()] for s in (a, b)]
            assert args[0] == args[1]
        else:
            assert a["arguments"] == b["arguments"]  # the same requests
        got, want = loglikelihoods(a), loglikelihoods(b)
        assert got == pytest.approx(want, abs=1e-4, rel=0), (a["doc_id"], got, want)
        if task == "loglik_mc":
            assert greedy(a) == greedy(b)


def assert_metrics(ours: dict, ref: dict, task: str, metrics: list[str]) -> None:
    for metric in metrics:
        key = f"{metric},none"
        assert math.isclose(ours[task][key], ref[task][key], rel_tol=1e-4, abs_tol=1e-6), metric

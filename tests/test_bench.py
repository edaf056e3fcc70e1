"""The benchmark's smoke run: the same code as `make bench`, on the tiny model, a few prompts.

Its timings mean nothing; it keeps `bench/run.py` working, and checks that the paths it
compares give the same numbers (to 1e-4, in float32). `make soak` runs it: the echo rows
(`SHORT`: two servers, each alone, about 4 minutes here), and every row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEFAULT_PROCESSES

ROOT = Path(__file__).resolve().parent.parent

#: The rows of the short smoke run: rows 14 and 15.
SHORT = ("echo",)


def smoke(tmp_path: Path, only: tuple[str, ...] | None) -> tuple[dict, str]:
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--json", str(out)]
    if only:
        cmd += ["--only", ",".join(only)]
    # The bench's engines run in the processes that vLLM gives them by default, as measured.
    env = dict(os.environ, **DEFAULT_PROCESSES)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["table"] in run.stdout
    return figures, figures["table"]


def check_echo(figures: dict, table: str) -> None:
    echo = figures["echo"]
    for task in ("bench_offline_mc", "bench_offline_mmlu"):
        assert echo[f"{task}_max_abs_diff"] <= 1e-4
        assert echo["ours"][task]["acc"] == echo["vllm"][task]["acc"]
    assert echo["shared_tokens"] > 0  # the plugin's server read shared contexts
    assert figures["measured_on"]["echo"]["cpu"]["model"]
    assert "≥ 3×" in table


@pytest.mark.soak
def test_bench_smoke_run_of_the_echo_rows(tmp_path):
    figures, table = smoke(tmp_path, SHORT)
    check_echo(figures, table)
    assert table.count("\n| ") == 1 + 2  # the separator, rows 14 and 15


@pytest.mark.soak
def test_bench_smoke_run_of_every_row(tmp_path):
    figures, table = smoke(tmp_path, None)
    check_echo(figures, table)
    (server,) = figures["server"].values()  # the smoke run measures one CPU setting
    assert all(v > 0 for v in server["wall"].values())
    # CPU times tick in 10 ms steps, which a smoke run's few prompts may not reach
    assert all(v >= 0 for v in server["frontend_us"].values())
    assert "memory" in figures
    for row in ("offline", "multiple_choice", "offline_multiple_choice", "lm_eval", "batch",
                "lm_eval_offline", "token_responses", "words"):  # fmt: skip
        assert row in figures
    assert figures["measured_on"]["lm_eval_offline"]["cpu"]["model"]
    # the separator, 5 rows for the CPU setting, multiple choice at one block size, memory,
    # offline multiple choice, lm-eval, batch, lm-eval in process (multiple choice, rolling,
    # 5-shot), token-id responses, echo (2), words (the smoke run leaves out row 5 on a 131k
    # vocabulary)
    assert table.count("\n| ") == 18
    assert figures["words"]["words_per_doc"] > 0
    assert figures["multiple_choice"]["max_abs_diff"] <= 1e-4
    assert figures["token_responses"]["max_abs_diff"] <= 1e-4
    assert figures["lm_eval"]["ours_acc"] == figures["lm_eval"]["local_completions_acc"]
    in_process = figures["lm_eval_offline"]
    assert in_process["bench_offline_mc_max_abs_diff"] <= 1e-4
    assert in_process["bench_offline_rolling_max_abs_diff"] <= 1e-4
    assert in_process["bench_offline_mmlu_max_abs_diff"] <= 1e-4
    for side in ("ours", "vllm"):
        assert in_process[side]["bench_offline_mc"]["seconds"] > 0
    for goal in ("≤ 0.8×", "≤ 1.6×", "no len × vocab growth", "≤ 0.3×", "≥ 1.0×", "≥ 4.5×", "≥ 4×",
                 "≥ 0.95×", "≥ 1.3×", "≤ 1.1×"):  # fmt: skip
        assert goal in table

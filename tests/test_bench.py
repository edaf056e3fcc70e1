"""The benchmark's smoke run: the same code as `make bench`, on the tiny model, a few prompts.

Its timings mean nothing; it keeps `bench/run.py` working, and checks that the multiple-choice
path (context from the prefix cache) gives the numbers of per-pair scoring.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run(tmp_path):
    out = tmp_path / "smoke.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    for row in ("offline", "server", "multiple_choice", "memory", "offline_multiple_choice",
                "lm_eval", "batch", "lm_eval_offline", "token_responses"):  # fmt: skip
        assert row in figures
    assert figures["measured_on"]["lm_eval_offline"]["cpu"]["model"]
    (server,) = figures["server"].values()  # the smoke run measures one CPU setting
    assert all(v > 0 for v in server["wall"].values())
    # CPU times tick in 10 ms steps, which a smoke run's few prompts may not reach
    assert all(v >= 0 for v in server["frontend_us"].values())
    assert figures["multiple_choice"]["max_abs_diff"] <= 1e-4
    table = figures["table"]
    # the separator, 5 rows for the CPU setting, multiple choice at one block size, memory,
    # offline multiple choice, lm-eval, batch, lm-eval in process (multiple choice, rolling,
    # 5-shot), token-id responses (the smoke run leaves out row 5 on a 131k vocabulary)
    assert table.count("\n| ") == 15
    assert figures["token_responses"]["max_abs_diff"] <= 1e-4
    assert figures["lm_eval"]["ours_acc"] == figures["lm_eval"]["local_completions_acc"]
    in_process = figures["lm_eval_offline"]
    assert in_process["bench_offline_mc_max_abs_diff"] <= 1e-4
    assert in_process["bench_offline_rolling_max_abs_diff"] <= 1e-4
    assert in_process["bench_offline_mmlu_max_abs_diff"] <= 1e-4
    for side in ("ours", "vllm"):
        assert in_process[side]["bench_offline_mc"]["seconds"] > 0
    for goal in ("≤ 0.8×", "≤ 1.6×", "≥ 1.0×", "≥ 4.5×", "≤ 0.3×", "no len × vocab growth", "≥ 4×",
                 "≥ 3×", "≥ 0.95×", "≥ 1.3×"):  # fmt: skip
        assert goal in table
    assert table in run.stdout

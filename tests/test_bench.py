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
    for row in ("offline", "server", "multiple_choice", "memory"):
        assert row in figures
    assert all(v > 0 for v in figures["server"].values())
    assert figures["multiple_choice"]["max_abs_diff"] <= 1e-4
    table = figures["table"]
    assert table.count("\n| ") == 6 and "≥ 4×" in table and "≤ 0.8×" in table
    assert table in run.stdout

"""Row 17: `vllm-loglik report` on a run of 10,000 lines with per-token details.

A real run first: `vllm-loglik score --details` (top 3 alternatives per token, word scores on
every fifth line) on the tiny demo model, in float32, of 10,000 texts of about 100 tokens each
(the report's cost grows with the tokens it holds, not with the model that scored them). Then:

- the report's size, against the scores file's (the report holds every token, its logprob,
  rank and alternatives, rounded as the file has them);
- the time to write it (`vllm-loglik report`);
- in headless Chromium (Debian's, driven by Playwright), the time from navigation until the
  page is usable (its script has drawn every view: `body[data-ready]`), against the time the
  same browser takes to load the same page without its script (its data inert in the page),
  the baseline: what opening the file costs without the report's own work (parsing its data,
  drawing the views). Each
  side is opened once to warm up, then 3 times; the median is kept. Then the time to sort the
  table by perplexity and to open a line.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT

LINES = 10_000
SMOKE_LINES = 300


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise SystemExit("row 17 needs Chromium: apt-get install -y chromium")
    return path


def scores_file(folder: Path, lines: int) -> Path:
    """A real `--details` run of `lines` texts on the demo model (kept between bench runs)."""
    from vllm_loglik.testing import build_tiny_model, default_corpus

    out = folder / f"scores-{lines}.jsonl"
    if out.exists() and out.read_text(encoding="utf-8").count("\n") == lines:
        return out
    model = build_tiny_model(folder / "tiny-model")
    words = default_corpus().split()
    source = folder / f"in-{lines}.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i in range(lines):
            at = (i * 31) % (len(words) - 60)
            text = " ".join(words[at : at + 30 + i % 25])
            options = {"top_logprobs": 3, **({"words": True} if i % 5 == 0 else {})}
            f.write(json.dumps({"id": f"doc-{i}", "prompt": text, "loglikelihood": options}) + "\n")
    out.unlink(missing_ok=True)
    cli = str(Path(sys.executable).parent / "vllm-loglik")
    subprocess.run(
        [cli, "score", str(model), "--input", str(source), "--output", str(out), "--details",
         "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0"],
        check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def report_row(smoke: bool) -> dict:
    from playwright.sync_api import sync_playwright

    from vllm_loglik.report import write_report

    folder = ROOT / ".cache" / "bench-report"
    folder.mkdir(parents=True, exist_ok=True)
    lines = SMOKE_LINES if smoke else LINES
    scores = scores_file(folder, lines)
    html = folder / f"report-{lines}.html"
    start = time.perf_counter()
    report = write_report(scores, html)
    write_s = time.perf_counter() - start
    assert report.lines == lines and not report.unreadable
    # The baseline: the same page, its data still in it, without the script that draws it.
    page_text = html.read_text(encoding="utf-8")
    script_at = page_text.rindex("<script>")
    plain_copy = html.with_name(html.stem + "-no-script.html")
    plain_copy.write_text(page_text[:script_at] + "</body></html>\n", encoding="utf-8")

    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=args)

        def open_report() -> tuple[float, float, float]:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(html.as_uri(), timeout=120_000)
            page.wait_for_selector("body[data-ready]", timeout=120_000)
            usable = time.perf_counter() - t0
            page.click("nav button[data-view=lines]")
            t1 = time.perf_counter()
            page.click("#lines th button[data-key=perplexity]")
            page.wait_for_function("document.querySelector('#lines th[aria-sort]') !== null")
            sort = time.perf_counter() - t1
            t2 = time.perf_counter()
            page.click("#lines tbody tr >> nth=0")
            page.wait_for_selector("#heatmap .tok")
            open_line = time.perf_counter() - t2
            page.close()
            assert not errors, errors
            return usable, sort, open_line

        def open_plain() -> float:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            t0 = time.perf_counter()
            page.goto(plain_copy.as_uri(), wait_until="load", timeout=120_000)
            took = time.perf_counter() - t0
            page.close()
            return took

        open_report(), open_plain()  # warm-up, each side the same way
        runs = [open_report() for _ in range(3)]
        plain = [open_plain() for _ in range(3)]
        browser.close()
    usable = statistics.median(r[0] for r in runs)
    return {
        "lines": lines,
        "texts": len(report.rows),
        "tokens": sum(r["num_tokens"] for r in report.rows),
        "scores_mb": scores.stat().st_size / 1e6,
        "report_mb": html.stat().st_size / 1e6,
        "write_s": write_s,
        "usable_s": usable,
        "plain_text_s": statistics.median(plain),
        "sort_s": statistics.median(r[1] for r in runs),
        "open_line_s": statistics.median(r[2] for r in runs),
    }


def table_rows(r: dict, size) -> list[tuple[str, str, float, str, str]]:  # noqa: ANN001
    if "report" not in r:
        return []
    b = r["report"]
    return [
        ("17. report of a --details run: time until usable vs the same page without its script",
         "Chromium headless", b["usable_s"] / b["plain_text_s"], "< 3 s, < 50 MB",
         f"{b['usable_s']:.2f} vs {b['plain_text_s']:.2f} s; {b['report_mb']:.1f} MB "
         f"({b['scores_mb']:.1f} MB of scores), {b['lines']:,} lines, {b['tokens']:,} tokens; "
         f"written in {b['write_s']:.1f} s; sort {b['sort_s'] * 1000:.0f} ms, "
         f"open a line {b['open_line_s'] * 1000:.0f} ms"),
    ]  # fmt: skip

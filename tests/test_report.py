"""`vllm-loglik report`: reports of real runs of the demo model, read back and opened in a real
browser (Debian's Chromium, headless, driven by Playwright).

The runs: a file of multiple-choice questions with labels, documents with word scores and bad
lines, scored through the test server with `--details` and `--report`; the same file compact;
an OpenAI Batch file; and a file of saved server responses (the plugin's, vLLM's own echo
scoring, a chat reply) with lines that are not responses. In the browser: no console error,
the summary's numbers are the file's, hovering (and focusing) a token shows its logprob and
rank from the file, GLTR's rank buckets colour it, sorting by perplexity orders the table,
and the ECE shown is the one computed here from the file. A screenshot of each view is kept in
`artifacts/report/`.

Without Chromium (outside CI), the browser tests say how to install it and skip; with
`VLLM_LOGLIK_REQUIRE_BROWSER=1` (`.ci/run`) they fail instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import httpx
import pytest

from vllm_loglik import report as report_module
from vllm_loglik.testing import default_corpus

from .conftest import API_KEY
from .test_batch import batch_line, read, score

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "report"
CORPUS = default_corpus()
CHOICES = [" red", " bread", " a table", " blue"]
HOSTILE = "Tags: </script><!--<script> & <b>bold</b> \u2028 end"


def mc_lines() -> list[str]:
    lines = []
    for i in range(24):
        lines.append({"id": f"q{i}", "prompt": f"Question {i}: which of these is a colour? Answer:",
                      "loglikelihood": {"continuations": CHOICES, "top_logprobs": 3},
                      "label": (0, 3, 1)[i % 3]})  # fmt: skip
    for i in range(6):
        text = " ".join(CORPUS.split()[i * 40 : i * 40 + 25])
        lines.append({"id": f"doc{i}", "prompt": text,
                      "loglikelihood": {"top_logprobs": 3, "words": True}})  # fmt: skip
    # Text that would end the page's data element or change how HTML reads it, if not escaped.
    lines.append({"id": "html", "prompt": HOSTILE, "loglikelihood": {"top_logprobs": 3}})
    lines.append({"id": "bad-option", "prompt": "x", "loglikelihood": {"bogus": 1}})
    return [json.dumps(line, ensure_ascii=False) for line in lines] + ["{not json"]


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    (folder / "mc.jsonl").write_text("\n".join(mc_lines()) + "\n", encoding="utf-8")
    detailed = score(["--server", server.url, "--details", "--input", str(folder / "mc.jsonl"),
                      "--output", str(folder / "details.jsonl"),
                      "--report", str(folder / "details.html")])  # fmt: skip
    assert detailed.returncode == 1, detailed.stderr[-3000:]  # two bad lines
    compact = score(["--server", server.url, "--input", str(folder / "mc.jsonl"),
                     "--output", str(folder / "compact.jsonl")])  # fmt: skip
    assert compact.returncode == 1, compact.stderr[-3000:]
    batch = [batch_line(f"b{i}", json.loads(line)) for i, line in enumerate(mc_lines()[:5])]
    batch.append(batch_line("echo", {"prompt": "The quick brown fox.", "echo": True, "logprobs": 2,
                                     "max_tokens": 0}))  # fmt: skip
    (folder / "batch.jsonl").write_text("\n".join(batch) + "\n", encoding="utf-8")
    run = score(["--server", server.url, "--input", str(folder / "batch.jsonl"),
                 "--output", str(folder / "batch-out.jsonl")])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    # Saved server responses, as a user keeps them: one JSON response per line.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    saved = []
    for path, body in (
        ("/v1/completions", {"prompt": "The quick brown fox jumps.", "max_tokens": 0,
                             "loglikelihood": {"top_logprobs": 2}}),
        ("/v1/completions", {"prompt": "The quick brown fox jumps.", "max_tokens": 0,
                             "echo": True, "logprobs": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                  "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    ):  # fmt: skip
        response = httpx.post(server.url + path, json={"model": "tiny", **body}, headers=headers,
                              timeout=120)  # fmt: skip
        assert response.status_code == 200, response.text
        saved.append(response.text.strip())
    saved += ["[1, 2, 3]", '{"something": "else"}', "{cut off"]
    (folder / "saved.jsonl").write_text("\n".join(saved) + "\n", encoding="utf-8")
    for name in ("compact", "batch-out", "saved"):
        report_module.write_report(folder / f"{name}.jsonl", folder / f"{name}.html")
    return folder


# ---------------------------------------------------------------- what the report reads


def expected_ece(records: list[dict], bins: int = 10) -> tuple[float, float]:
    """Accuracy and ECE of the labelled lines, computed here from the file."""
    rows = []
    for record in records:
        if record.get("label") is None or "loglikelihood" not in record:
            continue
        lps = [e["logprob"] for e in record["loglikelihood"]]
        top = max(lps)
        probs = [math.exp(lp - top) for lp in lps]
        chosen = lps.index(top)
        rows.append((probs[chosen] / sum(probs), chosen == record["label"]))
    ece = 0.0
    for b in range(bins):
        group = [(c, ok) for c, ok in rows if min(int(c * bins), bins - 1) == b]
        if group:
            acc = sum(ok for _, ok in group) / len(group)
            conf = sum(c for c, _ in group) / len(group)
            ece += len(group) / len(rows) * abs(acc - conf)
    return sum(ok for _, ok in rows) / len(rows), ece


def test_the_report_reads_every_format_and_lists_what_it_cannot(runs):
    details = read(runs / "details.jsonl")
    report = report_module.read(runs / "details.jsonl")
    assert report.lines == len(details)
    assert len(report.errors) == sum("error" in r for r in details) == 2
    assert len(report.rows) == sum(len(r.get("loglikelihood", [])) for r in details)
    assert len(report.questions) == 24
    assert all(d["tokens"] for d in report.details)
    compact = report_module.read(runs / "compact.jsonl")
    assert [r["logprob"] for r in compact.rows] == [r["logprob"] for r in report.rows]
    assert not compact.details or all(d["tokens"] is None for d in compact.details)

    batch = report_module.read(runs / "batch-out.jsonl")
    assert batch.formats == {"OpenAI Batch output"} and not batch.unreadable
    echo = batch.rows[-1]  # vLLM's own echo scoring: every token but the first
    out = read(runs / "batch-out.jsonl")[-1]["response"]["body"]["choices"][0]["logprobs"]
    assert echo["num_tokens"] == len(out["tokens"]) - 1
    assert echo["logprob"] == pytest.approx(sum(out["token_logprobs"][1:]))

    saved = report_module.read(runs / "saved.jsonl")
    assert saved.formats == {"server responses"} and saved.models == {"tiny"}
    assert [u["line"] for u in saved.unreadable] == [4, 5, 6]
    assert len(saved.rows) == 3
    plugin, native = saved.rows[0], saved.rows[1]
    assert plugin["logprob"] == pytest.approx(native["logprob"], abs=1e-4)  # the same numbers
    assert plugin["num_tokens"] == native["num_tokens"]


def test_the_calibration_is_the_one_computed_from_the_file(runs):
    accuracy, ece = expected_ece(read(runs / "details.jsonl"))
    data = report_module.data(report_module.read(runs / "details.jsonl"), runs, None)
    assert data["summary"]["accuracy"] == pytest.approx(accuracy)
    assert data["calibration"]["ece"] == pytest.approx(ece)


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        why = ("no Chromium: install Debian's package (sudo apt-get install -y chromium)"
               if executable is None else "no playwright: pip install playwright")  # fmt: skip
        if os.environ.get("VLLM_LOGLIK_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (VLLM_LOGLIK_REQUIRE_BROWSER=1: the browser tests may not skip)")
        pytest.skip(why)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
        ])  # fmt: skip
        yield chromium
        chromium.close()


class Page:
    """A report opened in the browser, with every console error and page error kept."""

    def __init__(self, browser, path: Path):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(m.text))
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.on("request", lambda r: r.url.startswith("file:") or self.problems.append(f"request {r.url}"))
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("body[data-ready]")

    def number(self, selector: str) -> float:
        return float(self.page.inner_text(selector).replace(",", ""))

    def shot(self, name: str, full: bool = False) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)

    def close(self) -> None:
        self.page.close()
        assert self.problems == []


def test_the_report_in_a_browser(browser, runs):
    records = read(runs / "details.jsonl")
    page = Page(browser, runs / "details.html")
    p = page.page
    # The summary is the file's.
    entries = [e for r in records for e in r.get("loglikelihood", [])]
    assert page.number("#s-lines") == len(records)
    assert page.number("#s-texts") == len(entries)
    assert page.number("#s-tokens") == sum(e["num_tokens"] for e in entries)
    assert page.number("#s-errors") == sum("error" in r for r in records)
    assert page.number("#s-unreadable") == 0
    assert "/v1" not in p.inner_text("#settings") and "--details" in p.inner_text("#settings")
    assert p.query_selector_all("#histogram rect.bar")
    page.shot("overview", full=True)

    # Sorting the table by perplexity orders it (descending, then ascending).
    p.click("nav button[data-view=lines]")
    p.click("#lines th button[data-key=perplexity]")
    shown = [float(t) for t in p.eval_on_selector_all("#lines tbody td.perplexity", "els => els.map(e => e.textContent)")]
    assert shown == sorted(shown, reverse=True) and len(shown) == min(100, len(entries))
    top = max(e["perplexity"] for e in entries)
    assert shown[0] == pytest.approx(top, rel=1e-3)
    page.shot("lines")
    p.click("#lines th button[data-key=perplexity]")
    shown = [float(t) for t in p.eval_on_selector_all("#lines tbody td.perplexity", "els => els.map(e => e.textContent)")]
    assert shown == sorted(shown)

    # A document's tokens: hovering one shows its logprob and rank from the file.
    doc = next(r for r in records if r.get("id") == "doc2")
    content = doc["loglikelihood"][0]["content"]
    p.fill("#search", "doc2")
    p.click("#lines tbody tr >> nth=0")
    tokens = p.query_selector_all("#heatmap .tok")
    assert len(tokens) == len(content)
    for k in (0, 3, len(content) - 1):
        tokens[k].hover()
        tip = p.inner_text("#tooltip")
        assert f"logprob {content[k]['logprob']:.4f}" in tip, tip
        assert f"rank {content[k]['rank']}" in tip, tip
        assert json.dumps(content[k]["token"], ensure_ascii=False) in tip
        for alt in content[k]["top_logprobs"]:
            assert f"{alt['logprob']:.4f}" in tip
    page.shot("line-surprisal")
    tokens[1].focus()  # keyboards: focus shows it too
    assert f"logprob {content[1]['logprob']:.4f}" in p.inner_text("#tooltip")
    # GLTR's buckets: each token's colour is its rank's.
    p.check("input[value=rank]")
    colours = {10: "rgb(182, 232, 176)", 100: "rgb(251, 232, 154)", 1000: "rgb(247, 169, 156)"}
    for tok, t in zip(p.query_selector_all("#heatmap .tok"), content, strict=True):
        want = next((c for limit, c in colours.items() if t["rank"] <= limit), "rgb(214, 168, 240)")
        assert tok.evaluate("e => e.style.background") == want
    p.hover("#heatmap .tok >> nth=2")
    page.shot("line-rank")
    # Its words.
    words = doc["loglikelihood"][0]["words"]
    assert len(p.query_selector_all("#words .word")) == len(words)
    p.hover("#words .word >> nth=1")
    assert f"logprob {words[1]['logprob']:.4f}" in p.inner_text("#tooltip")
    page.shot("line-words", full=True)

    # Multiple choice: the accuracy and the ECE computed here from the file.
    accuracy, ece = expected_ece(records)
    p.click("nav button[data-view=choice]")
    assert p.inner_text("#ece") == f"{ece:.4f}"
    assert p.inner_text("#accuracy") == f"{accuracy:.4f}"
    assert len(p.query_selector_all("#questions tbody tr")) == 24
    page.shot("multiple-choice", full=True)

    p.click("nav button[data-view=problems]")
    assert len(p.query_selector_all("#errors tbody tr")) == 2
    page.shot("problems")

    # Text that HTML would read as markup is shown as text.
    [html] = [r for r in records if r.get("id") == "html"]
    p.click("nav button[data-view=lines]")
    p.fill("#search", "html")
    assert p.eval_on_selector("#lines tbody td.text", "e => e.textContent") == html["loglikelihood"][0]["text"]
    p.click("#lines tbody tr >> nth=0")
    assert "</script><!--<script> & <b>bold</b>" in p.eval_on_selector("#heatmap", "e => e.textContent")
    page.close()


def test_reports_of_the_other_formats_open_without_errors(browser, runs):
    for name, lines, unreadable in (("compact", 33, 0), ("batch-out", 6, 0), ("saved", 6, 3)):
        page = Page(browser, runs / f"{name}.html")
        assert page.number("#s-lines") == lines and page.number("#s-unreadable") == unreadable
        page.page.click("nav button[data-view=lines]")
        page.page.click("#lines tbody tr >> nth=0")
        if name == "saved":
            page.page.click("nav button[data-view=problems]")
            assert len(page.page.query_selector_all("#unreadable tbody tr")) == 3
            page.shot("saved-responses-problems")
        page.close()


def test_the_recorded_run_names_the_settings_and_hides_secrets(runs):
    from vllm_loglik.cli import redacted

    info = json.loads((runs / "details.jsonl.run.json").read_text())
    assert info["mode"].startswith("--server ") and info["details"] is True
    assert "--report" in info["command"] and API_KEY not in json.dumps(info)
    assert redacted(["--server-api-key", "k1", "--api-key=k2", "--input", "f"]) == [
        "--server-api-key", "***", "--api-key=***", "--input", "f"
    ]


def test_a_line_that_cannot_be_read_is_listed_and_keeps_nothing(tmp_path):
    entry = {"index": 0, "text": " x", "logprob": -1.0, "num_tokens": 1, "is_greedy": True}
    lines = [
        {"id": "a", "line": 1, "loglikelihood": [entry, dict(entry, index=1)], "label": 5},
        {"id": "b", "line": 2, "loglikelihood": [{"text": 3}]},
        {"id": "c", "line": 3, "loglikelihood": "many"},
        {"id": "d", "line": 4, "loglikelihood": [entry, dict(entry, index=1, logprob=-2.0)],
         "label": 1},
    ]  # fmt: skip
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n{\n")
    report = report_module.write_report(tmp_path / "s.jsonl", tmp_path / "r.html")
    assert [u["line"] for u in report.unreadable] == [1, 2, 3, 6]
    assert "label is 5" in report.unreadable[0]["reason"]
    assert [r["id"] for r in report.rows] == ["d", "d"] and len(report.questions) == 1
    assert report.questions[0]["correct"] is False  # the first choice is the more likely

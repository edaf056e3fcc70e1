"""`vllm-loglik report SCORES.jsonl --output report.html`: one HTML file to look at a run.

The file is self-contained (its script, styles and data are inside; it loads nothing, so it
opens from disk, offline, in any browser) and stays responsive on 10,000 lines: the table is
paginated, and a line's tokens are drawn only when it is opened. It shows:

- **Summary**: lines, scored texts, scored tokens, errors and unreadable lines, and the run's
  model and settings (from `SCORES.jsonl.run.json`, which `vllm-loglik score` writes beside
  its output, or from the lines' own `model`).
- **Lines**: a table of every scored text (a line with several continuations has a row per
  continuation), sortable by each column and searchable by id and text, and a histogram of
  bits per byte (or perplexity) over them, with Tukey's outliers (beyond 1.5 interquartile
  ranges) marked and filterable.
- **A line**: its tokens as a heatmap coloured by surprisal, or by GLTR's rank buckets (the
  model's top 10, 100, 1,000, beyond); hovering or focusing a token shows its text, logprob,
  rank and top alternatives. Its words, when it has word scores.
- **Multiple choice**, when lines carry `label` (the index of the right continuation): the
  accuracy (the most likely continuation, as lm-eval's `acc`), each question with its choices'
  logprobs, and a reliability diagram with the expected calibration error: the probability
  of the chosen continuation, normalised over the line's continuations, against how often it
  was right, in 10 equal-width bins.
- **Problems**: the lines that failed, with their errors, and those that could not be read.

It reads the CLI's own output (compact, or `--details`), the OpenAI Batch format's output, and
saved server responses (a `text_completion` or `chat.completion` per line: `loglikelihood`
entries, or vLLM's own `logprobs` of an `echo` request or of a chat reply). A line it cannot
read is listed under Problems, never a crash.
"""

from __future__ import annotations

import html
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

#: The text of a row in the table (the whole text is in the line's view).
EXCERPT_CHARS = 160
#: Bins of the reliability diagram and of the expected calibration error.
ECE_BINS = 10
#: Bins of the histogram.
HISTOGRAM_BINS = 40


def run_info_path(output: Path) -> Path:
    """Where `vllm-loglik score` records the run's model and settings, beside its output."""
    return output.with_name(output.name + ".run.json")


@dataclass
class Report:
    """What a scores file holds, read and summed up; `data()` is what the page shows."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # a scored text each
    details: list[dict[str, Any]] = field(default_factory=list)  # per-token content of rows
    errors: list[dict[str, Any]] = field(default_factory=list)  # lines that failed
    unreadable: list[dict[str, Any]] = field(default_factory=list)  # lines not understood
    questions: list[dict[str, Any]] = field(default_factory=list)  # labelled lines
    lines: int = 0
    #: Every token text of the details, once: a token is its index here (a run's tokens
    #: repeat, and their alternatives more so).
    vocab: dict[str, int] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)
    formats: set[str] = field(default_factory=set)


def read(path: Path) -> Report:
    """Read a scores file: every line becomes rows, an error, or an unreadable line."""
    report = Report()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            report.lines += 1
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError("the line is not a JSON object")
                _read_record(report, n, record)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
                report.unreadable.append({"line": n, "reason": reason, "text": text[:300]})
    return report


def _read_record(report: Report, n: int, record: dict[str, Any]) -> None:
    label = record.get("label")
    if "custom_id" in record and "response" in record:  # the OpenAI Batch format
        report.formats.add("OpenAI Batch output")
        ident = record.get("custom_id")
        response = record.get("response") or {}
        body = response.get("body")
        error = record.get("error")
        if error is not None or response.get("status_code", 200) != 200:
            message = (error or {}).get("message") if isinstance(error, dict) else error
            if message is None and isinstance(body, dict):
                message = (body.get("error") or {}).get("message")
            report.errors.append({"line": n, "id": ident, "message": str(message),
                                  "status": response.get("status_code")})  # fmt: skip
            return
        _read_response(report, n, ident, body, label)
    elif "loglikelihood" in record or "error" in record:  # the CLI's own output
        report.formats.add("vllm-loglik score output")
        ident = record.get("id", record.get("line"))
        if record.get("error") is not None:
            error = record["error"]
            message = error.get("message") if isinstance(error, dict) else error
            report.errors.append({"line": n, "id": ident, "message": str(message)})
            return
        entries = record["loglikelihood"]
        if not isinstance(entries, list):
            raise ValueError("`loglikelihood` is not a list of entries")
        _add_entries(report, n, ident, [_entry(e) for e in entries], label)
    elif "choices" in record:  # a saved server response
        report.formats.add("server responses")
        _read_response(report, n, record.get("id"), record, label)
    else:
        raise ValueError("not a line of vllm-loglik score's output, of the OpenAI Batch "
                         "format's, or a server response")  # fmt: skip


def _read_response(report: Report, n: int, ident: Any, body: Any, label: Any) -> None:
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise ValueError("the response has no `choices`")
    if body.get("model"):
        report.models.add(str(body["model"]))
    choice = body["choices"][0]
    if choice.get("loglikelihood") is not None:
        entries = [_entry(e) for e in choice["loglikelihood"]]
    elif isinstance(choice.get("logprobs"), dict):
        entries = [_native_entry(choice)]
    else:
        raise ValueError("the response has neither `loglikelihood` entries nor `logprobs`")
    _add_entries(report, n, ident, entries, label)


def _entry(e: dict[str, Any]) -> dict[str, Any]:
    """A `loglikelihood` entry, as the page shows it."""
    text, logprob, tokens = e["text"], float(e["logprob"]), int(e["num_tokens"])
    out: dict[str, Any] = {"text": text, "logprob": logprob, "num_tokens": tokens,
                           "is_greedy": e.get("is_greedy")}  # fmt: skip
    if e.get("content") is not None:
        out["tokens"] = [
            [t["token"], t["logprob"], t.get("rank"),
             [[a["token"], a["logprob"]] for a in t.get("top_logprobs") or []]]
            for t in e["content"]
        ]  # fmt: skip
    if e.get("words") is not None:
        out["words"] = [[w["text"], w["offset"], w["logprob"], w["num_tokens"]] for w in e["words"]]
    return out


def _native_entry(choice: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own `logprobs` of a choice: a completion's (`tokens`, `token_logprobs`,
    `top_logprobs`; an `echo` request's first token has none) or a chat reply's (`content`).
    A token's rank is known where it is among the top alternatives."""
    logprobs = choice["logprobs"]
    tokens = []
    if "content" in logprobs:  # chat
        for t in logprobs["content"] or []:
            alts = [[a["token"], a["logprob"]] for a in t.get("top_logprobs") or []]
            tokens.append([t["token"], t["logprob"], _rank(t["token"], t["logprob"], alts), alts])
        text = (choice.get("message") or {}).get("content") or "".join(t[0] for t in tokens)
    else:
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
        for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops,
                                       strict=True):  # fmt: skip
            alts = sorted(([a, lp] for a, lp in (top or {}).items()), key=lambda a: -a[1])
            tokens.append([token, logprob, _rank(token, logprob, alts), alts])
        text = choice.get("text") or "".join(t[0] for t in tokens)
    scored = [t for t in tokens if t[1] is not None]
    return {"text": text, "logprob": sum(t[1] for t in scored), "num_tokens": len(scored),
            "is_greedy": all(t[2] == 1 for t in scored), "tokens": tokens}  # fmt: skip


def _rank(token: str, logprob: float | None, alts: list[list[Any]]) -> int | None:
    if logprob is None:
        return None
    higher = sum(1 for a in alts if a[1] > logprob)
    return higher + 1 if any(a[0] == token for a in alts) or higher < len(alts) else None


def _add_entries(
    report: Report, n: int, ident: Any, entries: list[dict[str, Any]], label: Any
) -> None:
    labelled = isinstance(label, int) and not isinstance(label, bool) and len(entries) >= 2
    if labelled and not 0 <= label < len(entries):  # before anything of the line is kept
        raise ValueError(f"label is {label}, and the line has {len(entries)} continuations")
    for i, e in enumerate(entries):
        num_bytes = len(e["text"].encode("utf-8", errors="surrogatepass"))
        tokens, logprob = e["num_tokens"], e["logprob"]
        row = {
            "line": n,
            "id": "" if ident is None else str(ident),
            "index": i,
            "of": len(entries),
            "text": e["text"][:EXCERPT_CHARS],
            "logprob": logprob,
            "num_tokens": tokens,
            "perplexity": math.exp(min(-logprob / tokens, 700)) if tokens else None,
            "bits_per_byte": -logprob / math.log(2) / num_bytes if num_bytes else None,
            "is_greedy": e.get("is_greedy"),
            "detail": -1,
        }
        if "tokens" in e or "words" in e:
            row["detail"] = len(report.details)
            report.details.append(_detail(report.vocab, e))
        report.rows.append(row)
    if labelled:
        report.questions.append(question(n, ident, [e["logprob"] for e in entries], label,
                                         [e["text"] for e in entries]))  # fmt: skip


def _detail(vocab: dict[str, int], e: dict[str, Any]) -> dict[str, Any]:
    """A text's tokens as flat lists, `[token, logprob, rank, alternative, its logprob, ...]`
    with each token text an index into `vocab` and each logprob to 4 decimals (what the page
    shows): about a third of the size of the file's own per-token objects."""
    def intern(text: str) -> int:
        return vocab.setdefault(text, len(vocab))

    def lp(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    out: dict[str, Any] = {"tokens": None, "words": None}
    if e.get("tokens") is not None:
        out["tokens"] = [
            [intern(t), lp(logprob), rank, *(v for a, x in alts for v in (intern(a), lp(x)))]
            for t, logprob, rank, alts in e["tokens"]
        ]
    else:
        out["text"] = e["text"]
    if e.get("words") is not None:
        out["words"] = [[w, offset, lp(x), n] for w, offset, x, n in e["words"]]
    return out


def question(
    n: int, ident: Any, logprobs: list[float], label: int, texts: list[str]
) -> dict[str, Any]:
    """A multiple-choice line: the chosen continuation (the most likely) and its probability
    normalised over the line's continuations."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    chosen = logprobs.index(top)
    return {"line": n, "id": "" if ident is None else str(ident), "label": label,
            "chosen": chosen, "confidence": weights[chosen] / sum(weights),
            "correct": chosen == label, "logprobs": logprobs,
            "choices": [t[:EXCERPT_CHARS] for t in texts]}  # fmt: skip


def calibration(questions: list[dict[str, Any]], bins: int = ECE_BINS) -> dict[str, Any]:
    """The reliability diagram's bins (equal width over [0, 1]; a confidence of 1 is in the
    last) and the expected calibration error, sum over bins of |bin| / N * |accuracy -
    confidence|."""
    groups: list[list[dict[str, Any]]] = [[] for _ in range(bins)]
    for q in questions:
        groups[min(int(q["confidence"] * bins), bins - 1)].append(q)
    out, ece = [], 0.0
    for b, group in enumerate(groups):
        if not group:
            out.append({"low": b / bins, "high": (b + 1) / bins, "count": 0})
            continue
        accuracy = sum(q["correct"] for q in group) / len(group)
        confidence = sum(q["confidence"] for q in group) / len(group)
        ece += len(group) / len(questions) * abs(accuracy - confidence)
        out.append({"low": b / bins, "high": (b + 1) / bins, "count": len(group),
                    "accuracy": accuracy, "confidence": confidence})  # fmt: skip
    return {"bins": out, "ece": ece if questions else None}


def outlier_fences(values: list[float]) -> tuple[float, float] | None:
    """Tukey's fences, 1.5 interquartile ranges beyond the quartiles."""
    if len(values) < 4:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)


def data(report: Report, path: Path, run: dict[str, Any] | None) -> dict[str, Any]:
    """Everything the page shows, as JSON."""
    bpb = [r["bits_per_byte"] for r in report.rows if r["bits_per_byte"] is not None]
    fences = outlier_fences(bpb)
    for r in report.rows:
        value = r["bits_per_byte"]
        r["outlier"] = bool(fences and value is not None and not fences[0] <= value <= fences[1])
    questions = report.questions
    summary = {
        "file": str(path),
        "lines": report.lines,
        "texts": len(report.rows),
        "scored_tokens": sum(r["num_tokens"] for r in report.rows),
        "errors": len(report.errors),
        "unreadable": len(report.unreadable),
        "outliers": sum(r["outlier"] for r in report.rows),
        "formats": sorted(report.formats),
        "models": sorted(report.models),
        "run": run,
        "made": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if questions:
        summary["accuracy"] = sum(q["correct"] for q in questions) / len(questions)
    return {
        "summary": summary,
        "rows": report.rows,
        "details": report.details,
        "vocab": list(report.vocab),
        "errors": report.errors,
        "unreadable": report.unreadable,
        "fences": fences,
        "questions": questions,
        "calibration": calibration(questions) if questions else None,
        "bins": HISTOGRAM_BINS,
    }


def render(payload: dict[str, Any]) -> str:
    """The page: the template with its script, styles and the data inlined."""
    folder = resources.files("vllm_loglik") / "data"
    page = (folder / "report.html").read_text(encoding="utf-8")
    script = (folder / "report.js").read_text(encoding="utf-8")
    style = (folder / "report.css").read_text(encoding="utf-8")
    # JSON inside <script>: a "<" of the text ("</script>", "<!--") could end the element or
    # change how the HTML parser reads it, so every one is written as the JSON escape \u003c
    # (outside strings JSON has none); U+2028/9 are line ends in old JavaScript.
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                      default=str)  # fmt: skip
    text = text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    title = html.escape(f"vllm-loglik report: {Path(payload['summary']['file']).name}")
    parts = {"{{TITLE}}": title, "/*{{STYLE}}*/": style, "{{DATA}}": text, "/*{{SCRIPT}}*/": script}
    # One pass over the template, so that nothing inlined is read as a placeholder.
    return re.sub("|".join(re.escape(k) for k in parts), lambda m: parts[m.group(0)], page)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_report(scores: Path, output: Path) -> Report:
    """Read `scores` and write its report to `output`."""
    report = read(scores)
    info = run_info_path(scores)
    run = None
    if info.is_file():
        try:
            run = json.loads(info.read_text(encoding="utf-8"))
        except ValueError:
            run = None
    payload = _finite(data(report, scores, run))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(render(payload), encoding="utf-8")
    tmp.replace(output)
    return report


def main(args: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="vllm-loglik report",
        description="Write a self-contained HTML report of a scores file (vllm-loglik score's "
        "output, compact or --details; the OpenAI Batch format's output; or saved server "
        "responses, one per line).",
    )
    parser.add_argument("scores", type=Path, help="the scores file (JSON Lines)")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="the HTML file (default: SCORES with .html)")  # fmt: skip
    parsed = parser.parse_args(args)
    if not parsed.scores.is_file():
        raise SystemExit(f"vllm-loglik report: no scores file {parsed.scores}")
    output = parsed.output or parsed.scores.with_suffix(".html")
    report = write_report(parsed.scores, output)
    print(f"{output}: {report.lines} lines, {len(report.rows)} scored texts, "
          f"{len(report.errors)} errors, {len(report.unreadable)} unreadable")  # fmt: skip

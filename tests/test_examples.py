"""Every script in `examples/` runs as written against the demo model behind the test server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(server, *args: str) -> str:
    env = dict(
        os.environ, OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=server.url + "/v1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("openai_client.py", ["completions:", "chat:", "rank"]),
        ("multiple_choice.py", ["' Mars'", "most likely:"]),
        ("rank_chat_replies.py", ["1. ", "3. ", "per token"]),
        ("surprising_tokens.py", ["expected:"]),
        ("teacher_logprobs.py", ["4 sequences", "' Paris.'", "teacher's top-1 agrees"]),
    ],
)
def test_client_examples(server, script, expected):
    out = run(server, sys.executable, str(EXAMPLES / script))
    for text in expected:
        assert text in out


def test_perplexity_example_offline_and_on_the_server(server, model_path):
    out = run(server, sys.executable, str(EXAMPLES / "perplexity.py"), model_path)
    assert "offline:" in out and "server:" in out and "bits per byte" in out


def test_word_surprisal_example_writes_its_csv_and_plot(server, tmp_path):
    """The psycholinguist's example: a CSV of every word with its surprisal in bits, and a plot;
    the numbers are the server's corrected word logprobs."""
    import ast
    import csv
    import math

    out = run(server, sys.executable, str(EXAMPLES / "word_surprisal.py"),
              "--csv", str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png"))  # fmt: skip
    assert "most surprising:" in out
    with open(tmp_path / "s.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    tree = ast.parse((EXAMPLES / "word_surprisal.py").read_text())
    [story] = [ast.literal_eval(node.value) for node in tree.body
               if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "STORY"]  # fmt: skip
    assert [r["word"] for r in rows] == story.split()
    assert all(story[int(r["offset"]):].startswith(r["word"]) for r in rows)
    response = server.client().completions.create(
        model="tiny", prompt=story, max_tokens=0, extra_body={"loglikelihood": {"words": True}}
    )
    words = response.choices[0].model_extra["loglikelihood"][0]["words"]
    assert [float(r["surprisal_bits"]) for r in rows] == pytest.approx(
        [-w["logprob"] / math.log(2) for w in words], rel=1e-6
    )
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_batch_cli_example(server):
    out = run(server, "bash", str(EXAMPLES / "batch_cli.sh"), server.url)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 4 and '"error"' in lines[3] and "exit status 1" in out
    assert all('"loglikelihood"' in line for line in lines[:3])
    report = Path(out.split("report (open it in a browser): ")[1].split()[0])
    page = report.read_text(encoding="utf-8")
    assert '<script type="application/json" id="data">' in page and "<link" not in page


def test_notebook_runs_on_the_demo_model_with_its_outputs_saved(server, monkeypatch):
    """`examples/loglikelihood.ipynb` is committed with its outputs (plots included), and runs
    top to bottom against the demo model with nbclient."""
    import nbclient
    import nbformat

    path = EXAMPLES / "loglikelihood.ipynb"
    saved = nbformat.read(path, as_version=4)
    code = [cell for cell in saved.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs for cell in code), "run it and save it with its outputs"
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 2

    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(EXAMPLES)}},
    ).execute()  # fmt: skip  (raises CellExecutionError on any error)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    for expected in ("model: tiny", "perplexity", "most surprising:", "most likely:", "1. ",
                     "exit status 1", "error:"):  # fmt: skip
        assert expected in text, expected
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # surprisal per token, and the choices as bars
    assert any("rgba(220, 40, 40" in o.get("data", {}).get("text/html", "") for o in outputs)

"""Ray Data: `LoglikelihoodScorer` in `map_batches` on a local Ray instance with one CPU actor, and
`vllm-loglik score --ray` joining that instance as it would join a cluster (`--ray-address`).

Both score on an engine of their own in the actor; the numbers are the offline API's, and the
CLI's output equals the in-process run's line for line, resuming after the lines that an
earlier run wrote.
"""

from __future__ import annotations

import json

import pytest

from vllm_loglik.testing import default_corpus

from .conftest import MAX_MODEL_LEN
from .test_batch import (
    ENGINE_FLAGS, check_batch_natives, check_batch_scores, offline_scores, read, score,
    write_batch_input,
)

ray = pytest.importorskip("ray", reason="the test extra installs ray[data]")

ENGINE = {
    "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "enforce_eager": True,
    "block_size": 32, "seed": 0,
}  # fmt: skip
CHAT = [{"role": "user", "content": "Name a colour."}]
# Rows of columns, as read from Parquet or JSON files: every row holds every column (null where
# a body has no such key), and the `loglikelihood` objects share one struct type.
ROWS = [
    {"id": "q1", "prompt": "Which is a colour? Answer:",
     "loglikelihood": {"continuations": [" red", " bread", " 🙂"]}},
    {"id": "q2", "prompt": "", "loglikelihood": {"continuations": ["Hello", " world"]}},
    {"id": "doc", "prompt": default_corpus()[:1200], "loglikelihood": {"scope": "rolling"}},
    {"id": "chat", "messages": CHAT + [{"role": "assistant", "content": "Blue."}],
     "loglikelihood": {"scope": "last_message"}},
    {"id": "replies", "messages": CHAT, "loglikelihood": {"continuations": ["Red.", "A dog."]}},
    {"id": "too-long", "prompt": "word " * 300, "loglikelihood": {"scope": "prompt"}},
    {"id": "plain", "prompt": "The quick brown fox.", "loglikelihood": None},
    {"id": "words", "prompt": "The quick  brown fox, Ωμέγα.", "loglikelihood": {"words": True}},
]  # fmt: skip


@pytest.fixture(scope="module")
def ray_address():
    from vllm_loglik.ray_data import ray_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ray_env()})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_map_batches_scores_rows_of_columns_as_the_offline_api(ray_address, model_path, llm):
    from vllm_loglik.ray_data import LoglikelihoodScorer

    # Ray Data yields batches in any order unless asked to keep it (`run_ray` asks too).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items(ROWS).map_batches(
        LoglikelihoodScorer,
        fn_constructor_kwargs={"model": model_path, **ENGINE},
        batch_format="pyarrow",
        batch_size=4,  # two batches on one engine
        concurrency=1,
        num_gpus=0,
    )
    rows = [row for batch in ds.iter_batches(batch_format="pyarrow") for row in batch.to_pylist()]
    assert [r["id"] for r in rows] == [r["id"] for r in ROWS]  # in order, ids carried
    assert set(rows[0]) == {"id", "line", "loglikelihood", "error"}
    for row, body in zip(rows, ROWS, strict=True):
        if body["id"] == "too-long":
            assert row["loglikelihood"] is None
            assert "tokens long" in row["error"]["message"] and row["error"]["param"] == "prompt"
            continue
        assert row["error"] is None, row["error"]
        body = {k: v for k, v in body.items() if v is not None}
        want = offline_scores(llm, body)
        assert len(row["loglikelihood"]) == len(want)
        for entry, expected in zip(row["loglikelihood"], want, strict=True):
            assert entry["text"] == expected.text
            assert entry["num_tokens"] == expected.num_tokens
            assert entry["is_greedy"] == expected.is_greedy
            assert abs(entry["logprob"] - expected.logprob) <= 1e-4 * max(expected.num_tokens, 1)
            assert "content" not in entry  # compact, as the CLI's default
            if expected.words is not None:  # word scores, as the offline API's
                assert [w["text"] for w in entry["words"]] == [w.text for w in expected.words]
                assert [w["logprob"] for w in entry["words"]] == pytest.approx(
                    [w.logprob for w in expected.words], abs=1e-4
                )


def test_cli_ray_resumes_and_equals_the_in_process_run(in_process, ray_address, model_path, tmp_path):
    folder, expected, _ = in_process
    reference = read(folder / "out.jsonl")
    out = tmp_path / "ray.jsonl"
    # An earlier run wrote three lines and part of a fourth.
    head = (folder / "out.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(head[:3]) + head[3][:20], encoding="utf-8")

    run = score([model_path, "--input", str(folder / "in.jsonl"), "--output", str(out),
                 "--ray", "--ray-address", ray_address, "--ray-batch-size", "5",
                 *ENGINE_FLAGS])  # fmt: skip
    failed_after_3 = sum(1 for _, error in expected[3:] if error is not None)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"{failed_after_3} lines failed" in run.stderr
    records = read(out)
    assert len(records) == len(reference)
    for got, want in zip(records, reference, strict=True):
        assert set(got) == set(want)
        assert got["id"] == want["id"] and got["line"] == want["line"]
        if "error" in want:
            assert got["error"] == want["error"]
            continue
        for a, b in zip(got["loglikelihood"], want["loglikelihood"], strict=True):
            numbers = (float, list)  # a word list holds floats too
            assert {k: v for k, v in a.items() if not isinstance(v, numbers)} == {
                k: v for k, v in b.items() if not isinstance(v, numbers)
            }
            assert [(w["text"], w["offset"]) for w in a.get("words", [])] == [
                (w["text"], w["offset"]) for w in b.get("words", [])
            ]
            assert [w["logprob"] for w in a.get("words", [])] == pytest.approx(
                [w["logprob"] for w in b.get("words", [])], abs=1e-4
            )
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4 * a["num_tokens"])
            assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)


def test_batches_of_every_format_become_plain_rows():
    """An actor's `__call__` takes the batch format that the user chose: pyarrow, pandas or
    numpy; each becomes plain Python rows, and nulls (NaN in pandas) mean absent keys."""
    import numpy as np
    import pyarrow as pa

    from vllm_loglik.ray_data import batch_rows, strip_nulls

    want = [
        {"line": 1, "prompt": "a", "loglikelihood": {"continuations": ["x", "y"], "scope": None}},
        {"line": 2, "prompt": None, "loglikelihood": {"continuations": None, "scope": "rolling"}},
    ]
    table = pa.Table.from_pylist(want)
    assert batch_rows(table) == want
    assert batch_rows(table.to_pandas()) == want
    numpy_batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    numpy_batch["loglikelihood"] = np.array(
        [{"continuations": np.array(["x", "y"]), "scope": None},
         {"continuations": None, "scope": "rolling"}], dtype=object)  # fmt: skip
    assert batch_rows(numpy_batch) == want
    assert [strip_nulls(r) for r in want] == [
        {"line": 1, "prompt": "a", "loglikelihood": {"continuations": ["x", "y"]}},
        {"line": 2, "loglikelihood": {"scope": "rolling"}},
    ]


def test_shards_cover_the_lines_after_a_resume_point(tmp_path):
    from vllm_loglik.ray_data import read_shard, shards

    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"prompt": f"line {i} é"}) for i in range(1, 12)] + ["no newline"]
    path.write_text("\n".join(lines), encoding="utf-8")
    for skip in (0, 1, 5, 12):
        parts = shards(path, skip, lines_per_shard=4)
        rows = [row for part in parts for row in read_shard(part)]
        assert [r["line"] for r in rows] == list(range(skip + 1, 13))
        assert [r["body"].decode() for r in rows] == lines[skip:]


@pytest.mark.soak  # an engine of its own (a minute here): the format's lines are read by the
# same code with and without Ray, which make test runs in the CLI's process and on the server
def test_cli_ray_reads_the_openai_batch_format(in_process, server, ray_address, model_path, tmp_path):
    """The OpenAI Batch input through `--ray`: the CLI's own scores line for line, and the
    bodies without `loglikelihood` as the server answers them."""
    folder, _, _ = in_process
    kinds = write_batch_input(tmp_path / "in.jsonl", folder / "in.jsonl")
    run = score([model_path, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "r"),
                 "--ray", "--ray-address", ray_address, "--ray-batch-size", "7",
                 *ENGINE_FLAGS])  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    check_batch_scores(tmp_path / "r", kinds, tmp_path / "in.jsonl", folder / "out.jsonl")
    check_batch_natives(tmp_path / "r", kinds, server, in_process=True)

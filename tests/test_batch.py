"""`vllm-loglik score`: the batch CLI, run as a user runs it, in a process of its own.

A file of mixed request bodies (every mode, both endpoints' shapes, ids, and bad lines) is
scored by the CLI with an engine in its process, and through the test server (`--server`):
both outputs hold one line per input line, in order, the same numbers as the offline API, and
the bad lines' errors. A run interrupted with SIGINT keeps every line it wrote, and a second
run on the same output resumes after them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vllm_loglik
from vllm_loglik.testing import default_corpus

from .conftest import API_KEY, DEFAULT_PROCESSES, HAS_V1, MAX_MODEL_LEN

CLI = str(Path(sys.executable).parent / "vllm-loglik")
ENGINE_FLAGS = [
    "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
    "--block-size", "32", "--seed", "0",
]  # fmt: skip
CONTEXT = "Question: which of these is a colour? Answer:"
CHOICES = [" red", " bread", " the river", " 🙂"]
CHAT = [{"role": "user", "content": "Name a colour."}]
LONG = default_corpus()[:1500]

GOOD = [
    {"id": "mc", "prompt": CONTEXT, "loglikelihood": {"continuations": CHOICES}},
    {"id": 7, "prompt": "The quick brown fox jumps over the lazy dog.", "loglikelihood": True},
    {"prompt": "No field: the prompt is scored."},
    {"id": "doc", "prompt": LONG, "loglikelihood": {"scope": "rolling"}},
    {"id": "chat-last", "messages": CHAT + [{"role": "assistant", "content": "Blue."}],
     "loglikelihood": {"scope": "last_message"}},
    {"id": "chat-candidates", "messages": CHAT, "loglikelihood": {"continuations": ["Red.", "A dog."]}},
    {"id": "ids", "prompt": [1, 200, 300, 400], "loglikelihood": {"continuations": [" x"]}},
    {"id": "words", "prompt": "The quick  brown fox,\tsaid Ωμέγα.", "loglikelihood": {"words": True}},
    {"id": "doc-words", "prompt": LONG, "loglikelihood": {"scope": "rolling", "words": True,
                                                          "word_probability": "tokens"}},
]  # fmt: skip
BAD = [
    ("{not json", "not JSON"),
    ("", "not JSON"),
    (json.dumps({"id": "long", "prompt": "word " * 300, "loglikelihood": True}), "tokens long"),
    (json.dumps({"id": "opt", "prompt": "x", "loglikelihood": {"bogus": 1}}), "bogus"),
    (json.dumps({"id": "none", "loglikelihood": True}), "needs `prompt`"),
    (json.dumps({"id": "w", "prompt": "Hello world", "loglikelihood": {"words": [[0, 3], [1, 4]]}}),
     "loglikelihood.words[1] is [1, 4]: it starts before the end"),
]


def write_input(path: Path) -> list[tuple[dict | None, str | None]]:
    """The mixed input, a bad line after every good one; (body, expected error) per line."""
    lines, expected = [], []
    for i, body in enumerate(GOOD):
        lines.append(json.dumps(body, ensure_ascii=False))
        expected.append((body, None))
        if i < len(BAD):
            lines.append(BAD[i][0])
            expected.append((None, BAD[i][1]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return expected


def offline_scores(llm, body: dict) -> list[vllm_loglik.Score]:
    """The offline API's scores for a good body."""
    options = body.get("loglikelihood", True)
    options = options if isinstance(options, dict) else {}
    kw = {"words": options.get("words", False),
          "word_probability": options.get("word_probability", "corrected")}  # fmt: skip
    if "messages" in body:
        if "continuations" in options:
            return vllm_loglik.chat_loglikelihood(
                llm, [body["messages"]], candidates=[options["continuations"]], **kw
            )[0]
        return vllm_loglik.chat_loglikelihood(llm, [body["messages"]], **kw)
    prompt = body["prompt"]
    if options.get("scope") == "rolling":
        return vllm_loglik.loglikelihood_rolling(llm, [prompt], **kw)
    if "continuations" in options:
        if isinstance(prompt, list):
            return [None] * len(options["continuations"])  # checked by the server's tests
        return vllm_loglik.loglikelihood(llm, [(prompt, c) for c in options["continuations"]], **kw)
    return vllm_loglik.prompt_loglikelihood(llm, [prompt], **kw)


def score(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENAI_API_KEY=API_KEY)
    return subprocess.run([CLI, "score", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)  # fmt: skip


def read(path: Path) -> list[dict]:
    # Lines end at "\n" only: `splitlines` would also cut at a U+2028 inside a JSON string.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def check_output(records: list[dict], expected, llm) -> None:
    assert [r["line"] for r in records] == list(range(1, len(expected) + 1))
    for record, (body, error) in zip(records, expected, strict=True):
        if error is not None:
            assert error in record["error"]["message"], record
            assert "loglikelihood" not in record
            continue
        assert record["id"] == body.get("id")
        entries = record["loglikelihood"]
        for entry, want in zip(entries, offline_scores(llm, body), strict=True):
            assert "content" not in entry  # compact by default
            if want is None:
                continue
            assert entry["num_tokens"] == want.num_tokens
            assert entry["is_greedy"] == want.is_greedy
            assert abs(entry["logprob"] - want.logprob) <= 1e-4 * want.num_tokens
            assert entry["perplexity"] == pytest.approx(want.perplexity, rel=1e-4)
            num_bytes = len(entry["text"].encode("utf-8"))
            assert entry["num_bytes"] == num_bytes
            assert entry["bits_per_byte"] == pytest.approx(
                -want.logprob / math.log(2) / num_bytes, rel=1e-4
            )
            if want.words is None:
                assert "words" not in entry
                continue
            assert [(w["text"], w["offset"]) for w in entry["words"]] == [
                (w.text, w.offset) for w in want.words
            ]
            assert [w["logprob"] for w in entry["words"]] == pytest.approx(
                [w.logprob for w in want.words], abs=1e-4
            )


def test_every_line_gets_a_record_in_order_with_the_offline_numbers(in_process, llm):
    folder, expected, run = in_process
    assert run.returncode == 1, run.stderr[-3000:]  # some lines failed, and the run went on
    assert f"{len(BAD)} lines failed" in run.stderr
    check_output(read(folder / "out.jsonl"), expected, llm)


def test_server_mode_gives_the_same_output(in_process, server, tmp_path):
    folder, expected, _ = in_process
    run = score(["--server", server.url, "--input", str(folder / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl")])  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    ours, theirs = read(folder / "out.jsonl"), read(tmp_path / "out.jsonl")
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() and a["line"] == b["line"] and a["id"] == b["id"]
        if "error" in a:
            continue  # the same line failed; the server's message names the field its way
        for x, y in zip(a["loglikelihood"], b["loglikelihood"], strict=True):
            assert x.keys() == y.keys()
            assert (x["text"], x["num_tokens"], x["is_greedy"]) == (y["text"], y["num_tokens"], y["is_greedy"])
            assert abs(x["logprob"] - y["logprob"]) <= 1e-4 * x["num_tokens"]


def test_details_add_the_per_token_content(server, llm, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps(GOOD[0]) + "\n")
    run = score(["--server", server.url, "--details", "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl")])  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    [record] = read(tmp_path / "out.jsonl")
    for entry, want in zip(record["loglikelihood"], offline_scores(llm, GOOD[0]), strict=True):
        assert [t["token_id"] for t in entry["content"]] == want.token_ids


def test_resume_after_a_partial_last_line(in_process, server, tmp_path):
    folder, expected, _ = in_process
    full = (folder / "out.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(full[:5]) + full[5][:20], encoding="utf-8")  # a crash mid-line
    run = score(["--server", server.url, "--input", str(folder / "in.jsonl"), "--output", str(out)])
    assert run.returncode == 1
    records = read(out)
    assert out.read_text(encoding="utf-8").startswith("".join(full[:5]))  # kept as it was
    assert [r["line"] for r in records] == list(range(1, len(expected) + 1))


def test_sigint_keeps_every_written_line_and_a_rerun_resumes(model_path, server, llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    texts = [f"Line {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(1000)]
    inp.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    env = dict(os.environ, **DEFAULT_PROCESSES)  # the engine's processes get the signal too
    proc = subprocess.Popen(
        [CLI, "score", model_path, "--input", str(inp), "--output", str(out), *ENGINE_FLAGS,
         "--budget-tokens", "64"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # a process group of its own, as a command in a terminal
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 20:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    # Ctrl-C in a terminal: SIGINT to the whole group, the engine's processes included.
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "run the same command again to resume" in stderr
    text = out.read_text()
    assert text.endswith("\n")  # whole lines only
    kept = read(out)
    assert 20 <= len(kept) < len(texts)
    assert [r["line"] for r in kept] == list(range(1, len(kept) + 1))

    run = score(["--server", server.url, "--input", str(inp), "--output", str(out)])
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.read_text().startswith(text)
    records = read(out)
    assert [r["id"] for r in records] == list(range(len(texts)))
    for i in (0, len(kept) - 1, len(kept), len(texts) - 1):  # either side of the interruption
        [want] = vllm_loglik.prompt_loglikelihood(llm, [texts[i]])
        assert abs(records[i]["loglikelihood"][0]["logprob"] - want.logprob) <= 1e-4 * want.num_tokens


def test_help_lists_our_flags_and_vllms_engine_flags():
    """`vllm-loglik score --help` runs on the installed vLLM (0.33 moved `LoRAParserAction`)."""
    run = subprocess.run([CLI, "score", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for flag in ("--input", "--server-retry-seconds", "--lora-modules", "--ray", "--max-model-len"):
        assert flag in run.stdout, flag
    run = subprocess.run([CLI, "fingerprints"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    runner = "target_logprobs" if HAS_V1 else "v2_scoring"  # V1's patch, or V2's fields
    assert f"{runner}: verified" in run.stdout and "echo: verified" in run.stdout


# ---------------------------------------------------------------- the OpenAI Batch format

#: Bodies without `loglikelihood`: answered as vLLM answers them (echo scoring, a generated
#: token with echo, plain generation at temperature 0).
NATIVE = [
    # EOS may not end these (`ignore_eos`). With `max_tokens: 0` vLLM still samples a token it
    # does not return, at the default temperature 1, and its `finish_reason` is that token's:
    # 'stop' where it happens to be EOS. At temperature 0 EOS can be a near-tie on the random
    # demo model, which the rounding of another batch settles either way.
    {"prompt": "The quick brown fox jumps over the lazy dog.", "echo": True, "logprobs": 3,
     "max_tokens": 0, "ignore_eos": True},
    {"prompt": "Ωμέγα and 🙂, said the fox.", "echo": True, "logprobs": 1, "max_tokens": 1,
     "temperature": 0, "ignore_eos": True},
    {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "logprobs": 2,
     "ignore_eos": True},
]  # fmt: skip
CHAT_GENERATES = {"messages": CHAT, "max_tokens": 2, "temperature": 0}


def batch_line(custom_id: str, body: dict) -> str:
    url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body},
                      ensure_ascii=False)  # fmt: skip


def write_batch_input(path: Path, own_input: Path) -> list[str]:
    """The mixed input of the CLI's own format, line for line in the OpenAI Batch format (a
    line that is not JSON stays as it is), then the bodies without `loglikelihood` and the
    format's own mistakes; the kinds of the lines."""
    lines, kinds = [], []
    for n, text in enumerate(own_input.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            lines.append(text)
            kinds.append("bad")
            continue
        body.pop("id", None)
        if "loglikelihood" not in body:
            body["loglikelihood"] = True  # the CLI's own format defaults to it
        lines.append(batch_line(f"own-{n}", body))
        kinds.append("own")
    for i, body in enumerate(NATIVE):
        lines.append(batch_line(f"native-{i}", body))
        kinds.append("native")
    lines.append(batch_line("chat-generates", CHAT_GENERATES))
    kinds.append("chat-generates")
    lines.append(json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}))
    lines.append(json.dumps({"custom_id": "url", "method": "POST", "url": "/v1/embeddings",
                             "body": {"input": "x"}}))  # fmt: skip
    kinds += ["method", "url"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return kinds


@pytest.fixture(scope="module")
def openai_batch_runs(in_process, server, model_path, tmp_path_factory):
    """The OpenAI Batch input, scored in the CLI's process and through the server."""
    folder, _, _ = in_process
    out = tmp_path_factory.mktemp("openai-batch")
    kinds = write_batch_input(out / "in.jsonl", folder / "in.jsonl")
    local = score([model_path, "--input", str(out / "in.jsonl"), "--output",
                   str(out / "local.jsonl"), *ENGINE_FLAGS])  # fmt: skip
    remote = score(["--server", server.url, "--input", str(out / "in.jsonl"), "--output",
                    str(out / "remote.jsonl")])  # fmt: skip
    return out, kinds, local, remote


def server_answer(server, body: dict) -> tuple[int, dict]:
    import httpx

    url = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(server.url + url, json={"model": "tiny", **body}, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    return response.status_code, response.json()


def same_answer(ours: dict, theirs: dict) -> None:
    """The same response body, field by field (its id, time and model name aside), floats
    within 1e-4."""
    assert ours.keys() == theirs.keys()
    # vLLM's version and a hash of the engine's configuration (which differ in their names)
    assert ours["system_fingerprint"].split("-")[:2] == theirs["system_fingerprint"].split("-")[:2]
    for key in ours.keys() - {"id", "created", "model", "system_fingerprint"}:
        close(ours[key], theirs[key], key)


def close(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-4, where
    else:
        assert a == b, where


def check_batch_scores(path: Path, kinds: list[str], batch_input: Path, own_output: Path) -> None:
    """An OpenAI Batch output: a line per input line, in order, under its custom_id, with the
    scores of the CLI's own format for the same bodies, line for line, and its errors."""
    inputs = [json.loads(t) if k != "bad" else None
              for t, k in zip(batch_input.read_text().splitlines(), kinds)]  # fmt: skip
    own = read(own_output)
    records = read(path)
    assert len(records) == len(kinds)
    for n, (record, kind) in enumerate(zip(records, kinds, strict=True)):
        assert set(record) == {"id", "custom_id", "response", "error"}
        assert record["custom_id"] == (inputs[n]["custom_id"] if inputs[n] else None)
        response = record["response"]
        if kind in ("own", "bad"):
            mine = own[n]
            if "error" in mine:
                assert response["status_code"] == 400 and record["error"]["message"], record
                assert response["body"]["error"]["message"] == record["error"]["message"]
                continue
            assert response["status_code"] == 200 and record["error"] is None, record
            entries = response["body"]["choices"][0]["loglikelihood"]
            for x, y in zip(entries, mine["loglikelihood"], strict=True):
                assert (x["text"], x["num_tokens"], x["is_greedy"]) == (y["text"], y["num_tokens"], y["is_greedy"])
                assert abs(x["logprob"] - y["logprob"]) <= 1e-4 * x["num_tokens"]
                assert "content" in x  # the server's default: per-token content
                assert ("words" in x) == ("words" in y)
        elif kind in ("method", "url"):
            assert response["status_code"] == 400 and record["error"]["param"] == kind


def check_batch_natives(path: Path, kinds: list[str], server, in_process: bool) -> None:
    """The bodies without `loglikelihood` answered as the server answers them, field by field."""
    records = read(path)
    natives = [r for r, k in zip(records, kinds) if k == "native"]
    for record, body in zip(natives, NATIVE, strict=True):
        status, want = server_answer(server, body)
        assert status == 200 and record["response"]["status_code"] == 200, (want, record)
        try:
            same_answer(record["response"]["body"], want)
        except AssertionError:
            if body.get("echo") or not greedy_near_tie(record["response"]["body"], want):
                raise


def greedy_near_tie(ours: dict, theirs: dict) -> bool:
    """Whether two greedy generations first part at a step whose two best logprobs are within
    1e-3 in both answers: a near-tie on the random demo model, which the rounding of another
    batch (the CLI's process against the server's) may settle either way. Up to that step the
    answers must be the same."""
    a, b = ours["choices"][0]["logprobs"], theirs["choices"][0]["logprobs"]
    at = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
    if at is None:
        return False
    close(a["token_logprobs"][:at], b["token_logprobs"][:at], "token_logprobs before the tie")
    for side in (a, b):
        best = sorted(side["top_logprobs"][at].values(), reverse=True)[:2]
        if len(best) < 2 or best[0] - best[1] > 1e-3:
            return False
    return True
    [chat] = [r for r, k in zip(records, kinds) if k == "chat-generates"]
    if in_process:  # no chat handler in the CLI's process: the error says what to do
        assert chat["response"]["status_code"] == 400
        assert "--server" in chat["error"]["message"]
    else:
        status, want = server_answer(server, CHAT_GENERATES)
        assert chat["response"]["status_code"] == status == 200
        assert chat["response"]["body"]["choices"][0]["message"] == want["choices"][0]["message"]


def test_openai_batch_format_gives_the_cli_formats_scores_line_for_line(in_process, openai_batch_runs):
    folder, _, _ = in_process
    out, kinds, local, remote = openai_batch_runs
    assert local.returncode == 1 and remote.returncode == 1, (local.stderr[-2000:], remote.stderr[-2000:])
    for run in ("local", "remote"):
        check_batch_scores(out / f"{run}.jsonl", kinds, out / "in.jsonl", folder / "out.jsonl")


def test_openai_batch_bodies_without_loglikelihood_as_the_server_answers(server, openai_batch_runs):
    out, kinds, _, _ = openai_batch_runs
    check_batch_natives(out / "local.jsonl", kinds, server, in_process=True)
    check_batch_natives(out / "remote.jsonl", kinds, server, in_process=False)


def test_openai_batch_resumes_after_a_partial_last_line(openai_batch_runs, server, tmp_path):
    out, kinds, _, _ = openai_batch_runs
    full = (out / "remote.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    part = tmp_path / "out.jsonl"
    part.write_text("".join(full[:4]) + full[4][:30], encoding="utf-8")
    run = score(["--server", server.url, "--input", str(out / "in.jsonl"), "--output", str(part)])
    assert run.returncode == 1, run.stderr[-2000:]
    records = read(part)
    assert part.read_text(encoding="utf-8").startswith("".join(full[:4]))
    assert [r["custom_id"] for r in records] == [json.loads(x)["custom_id"] for x in full]

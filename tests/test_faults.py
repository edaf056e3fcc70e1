"""Faults an operator meets, each made to happen for real (the long versions: `make soak`).

- The engine process killed under load: no client hangs, and the API server exits with a
  non-zero status and a log line that says why, as vLLM's own does, so that an orchestrator
  restarts it.
- `vllm-loglik score` killed with SIGKILL at a random point and run again: every line once, in
  order, with the numbers of an uninterrupted run.
- The same through `--server`, with the server killed and started again under the running
  batch: the CLI sends its lines again until the server answers, and the output is complete.
- A Ray Data actor killed mid-batch under `--ray`: Ray starts it again and retries its batch,
  and the output is complete and in order.

The short faults (a client that leaves: counted as `cancelled`, its work aborted) are in
`make test`: `tests/test_operations.py` and `tests/test_hostile.py`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import Server, default_processes
from .test_batch import CLI, ENGINE_FLAGS, read
from .test_server import MODEL

pytestmark = pytest.mark.soak


@pytest.fixture(scope="module", autouse=True)
def _default_processes():
    """These faults kill an engine's processes: every engine here runs in the processes that the
    CPU build gives it by default (an engine core and a worker of its own)."""
    with default_processes():
        yield


def write_lines(path: Path, n: int) -> list[str]:
    texts = [f"Line {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(n)]
    path.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return texts


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [CLI, "score", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kwargs,
    )  # fmt: skip


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen, within: float = 300) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} lines in {within} s (exit {proc.poll()})")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process and every process it started (its engine's too)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Every line once, in order, with the uninterrupted run's numbers."""
    assert [r["line"] for r in got] == [r["line"] for r in want]
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for a, b in zip(got, want, strict=True):
        [x], [y] = a["loglikelihood"], b["loglikelihood"]
        assert x["num_tokens"] == y["num_tokens"]
        assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-4 * y["num_tokens"])


@pytest.fixture(scope="module")
def reference(model_path, tmp_path_factory):
    """400 lines scored by one uninterrupted in-process run."""
    folder = tmp_path_factory.mktemp("faults")
    inp, out = folder / "in.jsonl", folder / "reference.jsonl"
    write_lines(inp, 400)
    proc = run_cli([model_path, "--input", str(inp), "--output", str(out), *ENGINE_FLAGS])
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    return inp, read(out)


def test_a_batch_killed_at_a_random_point_resumes_with_nothing_lost_or_twice(
    model_path, reference, tmp_path
):  # fmt: skip
    inp, want = reference
    out = tmp_path / "out.jsonl"
    args = [model_path, "--input", str(inp), "--output", str(out), *ENGINE_FLAGS,
            "--budget-tokens", "64"]  # fmt: skip
    proc = run_cli(args)
    # Anywhere in the run's first half, mid-line included (V2 on 0.34 writes the 400 lines in
    # under 3 s: a fixed wait could outlast it).
    wait_for_lines(out, random.randint(10, len(want) // 2), proc)
    time.sleep(random.uniform(0, 0.2))
    kill_group(proc)
    killed_at = out.read_text().count("\n")
    assert killed_at < len(want), "the run ended before it was killed"
    proc = run_cli(args)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert_same_records(read(out), want)
    print(f"\nkilled after {killed_at} of {len(want)} lines; resumed and complete")


def start_server(model_path, log: Path, port: int | None = None) -> Server:
    return Server(model_path, log, True, None, port=port)


def test_a_server_killed_and_restarted_under_a_server_batch(model_path, reference, tmp_path):
    """The CLI sends each line again while the server is gone (`--server-retry-seconds`), so a
    server that is back within that time loses the run nothing; one that is not back stops the
    run with a clear message, and the next run resumes."""
    inp, want = reference
    out = tmp_path / "out.jsonl"
    srv = start_server(model_path, tmp_path / "server-1.log")
    port = srv.port
    args = ["--server", srv.url, "--input", str(inp), "--output", str(out), "--concurrency", "2"]
    proc = run_cli([*args, "--server-retry-seconds", "240"])
    try:
        wait_for_lines(out, 20, proc)
        engine = psutil.Process(srv.proc.pid).children(recursive=True)
        srv.proc.kill()  # SIGKILL: the API server, then its engine's processes
        for child in engine:
            child.kill()
        srv.stop()
        killed_at = out.read_text().count("\n")
        srv = start_server(model_path, tmp_path / "server-2.log", port)
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        assert_same_records(read(out), want)
        assert 20 <= killed_at < len(want)
        # A server that does not come back: the run stops with the message, and resumes.
        out2 = tmp_path / "out2.jsonl"
        args2 = ["--server", srv.url, "--input", str(inp), "--output", str(out2),
                 "--concurrency", "2", "--server-retry-seconds", "3"]  # fmt: skip
        proc = run_cli(args2)
        wait_for_lines(out2, 20, proc)
        srv.stop()
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 75, stderr[-2000:]
        assert "gave no answer for 3 s" in stderr and "run the same command again" in stderr
        partial = out2.read_text()
        assert partial.endswith("\n") and partial.count("\n") < len(want)
        srv = start_server(model_path, tmp_path / "server-3.log", port)
        proc = run_cli(args2)
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        assert out2.read_text().startswith(partial)
        assert_same_records(read(out2), want)
    finally:
        if proc.poll() is None:
            kill_group(proc)
        srv.stop()


def engine_core(server: Server) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process under the server")


def test_the_engine_killed_under_load(model_path, tmp_path):
    """8 rolling requests in flight, and the engine process gets SIGKILL: every client has an
    answer or a closed connection within 60 s, and the API server exits with a non-zero status
    and a log line that says the engine died."""
    # A clean stop (SIGTERM) is not a death: status 0, as vLLM's own.
    srv = start_server(model_path, tmp_path / "clean.log")
    srv.proc.terminate()
    assert srv.proc.wait(timeout=60) == 0
    srv.stop()
    assert "has died" not in (tmp_path / "clean.log").read_text()
    log = tmp_path / "server.log"
    srv = start_server(model_path, log)
    try:
        body = {"model": MODEL, "max_tokens": 0, "prompt": "word " * 20_000,
                "loglikelihood": {"scope": "rolling", "content": False}}  # fmt: skip
        results: list = [None] * 8

        def client(i: int) -> None:
            try:
                results[i] = httpx.post(srv.url + "/v1/completions", json=body, timeout=120).status_code
            except httpx.HTTPError as e:
                results[i] = type(e).__name__

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        killed = time.monotonic()
        engine_core(srv).kill()
        for t in threads:
            t.join(timeout=max(0.0, 60 - (time.monotonic() - killed)))
        assert not any(t.is_alive() for t in threads), "a client still waits 60 s after"
        assert all(r is not None and r != 200 for r in results), results
        code = srv.proc.wait(timeout=max(1.0, 90 - (time.monotonic() - killed)))
        assert code == 1
        text = log.read_text()
        assert "the engine process has died; the API server shuts down and exits with status 1" in text, text[-3000:]
        print(f"\nclients: {results}; server exit {code}")
    finally:
        srv.stop()


def test_a_ray_actor_killed_mid_batch(model_path, reference, tmp_path):
    """Ray Data restarts the actor and retries its batch: the output is complete, in order,
    with the uninterrupted run's numbers."""
    pytest.importorskip("ray")
    inp, want = reference
    out = tmp_path / "out.jsonl"
    proc = run_cli([model_path, "--ray", "--ray-batch-size", "40", "--input", str(inp),
                    "--output", str(out), *ENGINE_FLAGS])  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        actor = None
        while time.monotonic() < deadline and actor is None and proc.poll() is None:
            for p in psutil.process_iter(["name", "cmdline"]):
                if "MapWorker" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or ()):
                    actor = p
            time.sleep(0.5)
        assert actor is not None, "no Ray Data actor found"
        wait_for_lines(out, 40, proc)
        engine = actor.children(recursive=True)
        actor.kill()
        for p in engine:
            p.kill()
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        assert_same_records(read(out), want)
    finally:
        if proc.poll() is None:
            kill_group(proc)


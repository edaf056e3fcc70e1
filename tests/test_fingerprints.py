"""The gates of the fast paths follow vLLM's code, not its version string (`vllm_loglik.fingerprints`).

- Units: how a relied-on function's source is found and compared, on hand-made tables.
- The installed vLLM (0.32 in `make test`, the next releases' Python in `make test-vllm-next`):
  every reliance of the model runner that runs holds (V1's on 0.32/0.33's CPU build, V2's
  scoring fields on 0.34), and on the test server every fast path was taken (on V1 the
  target-only trace, echo acceleration counted, no fallback for any gate), with the start-up
  line saying so.
- A vLLM whose relied-on code differs (`tests/changed_vllm/sitecustomize.py` serves copies of
  two of its modules with one statement more in a function each): the runner's fast path (V1's
  target-only path, V2's scoring fields) and echo acceleration are off, the log names each
  changed function, every request is counted as a fallback, and the numbers still equal
  transformers'.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vllm_loglik import fingerprints
from vllm_loglik.fingerprints import Reliance, check, checked, source_of
from vllm_loglik.protocol import entries
from vllm_loglik.testing import with_pythonpath

from .conftest import HAS_V1, TRACE, Server
from .test_server import MODEL, metric

TOL = 1e-4
GATES = ("prompt_logprobs_path", "echo_path", "cache_reads")
GATHER = "vllm.v1.sample.sampler:Sampler.gather_logprobs"
#: Code that every vLLM version here has (the output processor's logprobs).
PROCESSOR = "vllm.v1.engine.logprobs:LogprobsProcessor._update_prompt_logprobs"
#: A function of the running runner's fast path, changed on the changed server: V1's sampler
#: (the target-only patch reproduces it), or the V2 worker's token-id scores (the word patch).
RUNNER_CHANGE = GATHER if HAS_V1 else (
    "vllm.v1.worker.cpu.logprob:CPUPromptLogprobsWorker.compute_prompt_token_id_logprobs"
)
#: The reliances of the runner that does not run here.
OTHER_RUNNER = ("v2_scoring",) if HAS_V1 else ("target_logprobs", "output_layout")
TO_RESPONSE = (
    "vllm.entrypoints.openai.completion.serving:"
    "OpenAIServingCompletion.request_output_to_completion_response"
)


# ---------------------------------------------------------------- units


@pytest.mark.skipif(not HAS_V1, reason="V1's sampler, which this reads, is gone from vLLM 0.34")
def test_sources_are_found_without_importing_the_module():
    import sys

    method = source_of(GATHER)
    assert method.startswith("@staticmethod\ndef gather_logprobs(") or method.startswith(
        "def gather_logprobs("
    ), method[:80]
    assert source_of("vllm.v1.outputs:LogprobsTensors").startswith("class LogprobsTensors")
    assert "class FlatLogprobs" in source_of("vllm.logprobs")
    assert source_of("vllm.v1.sample.sampler:Sampler.no_such_method") is None
    assert source_of("vllm.no_such_module:anything") is None
    # Read from the file, not imported: the API server judges the engine's code so.
    name = "vllm.v1.worker.gpu_model_runner"
    if name not in sys.modules:
        assert "def _get_prompt_logprobs_dict" in source_of(f"{name}:GPUModelRunner")
        assert name not in sys.modules


def test_a_reliance_holds_on_a_version_whose_fingerprints_all_match():
    names = (PROCESSOR, "vllm.logprobs")
    reliance = Reliance("test", names, "something else")
    now = {n: fingerprints.fingerprint(n) for n in names}
    table = {"0.1.0": dict(now), "0.2.0": dict(now, **{PROCESSOR: "0" * 64})}
    verdict = check(reliance, table)
    assert verdict.holds and verdict.version == "0.1.0" and verdict.reason() is None
    table["0.10.0"] = dict(now)  # versions compare as numbers: 0.10 is newer than 0.2
    assert check(reliance, table).version == "0.10.0"
    # No version has every fingerprint: off, naming what differs from the newest.
    table = {"0.1.0": dict(now, **{"vllm.logprobs": "1" * 64}), "0.2.0": dict(now, **{PROCESSOR: "0" * 64})}
    verdict = check(reliance, table)
    assert not verdict.holds and verdict.changed == (PROCESSOR,)
    assert PROCESSOR in verdict.reason() and "something else" in verdict.describe()
    missing = Reliance("test", ("vllm.logprobs:NoSuchThing",), "x")
    assert check(missing, table).changed == ("vllm.logprobs:NoSuchThing (missing)",)


def test_every_verified_version_records_every_relied_on_name_it_has():
    """0.32 and 0.33 have V1 and no V2 scoring fields, 0.34 the reverse: each records every
    name of the reliances of its runners, and the others' only where it has them."""
    table = fingerprints.verified()
    assert {"0.32.0", "0.33.0", "0.34.0"} <= set(table)
    reliances = fingerprints.RELIANCES()
    runners = {"0.32.0": ("v2_scoring",), "0.33.0": ("v2_scoring",),
               "0.34.0": ("target_logprobs", "output_layout")}  # fmt: skip
    for version, others in runners.items():
        names = {n for name, r in reliances.items() if name not in others for n in r.relies_on}
        assert names <= set(table[version]), (version, names - set(table[version]))


# ---------------------------------------------------------------- the installed vLLM


def test_the_vllm_under_test_is_the_one_asked_for():
    """`make test-vllm-next` sets VLLM_LOGLIK_EXPECT_VLLM: the tree on PYTHONPATH is imported."""
    import vllm

    expected = os.environ.get("VLLM_LOGLIK_EXPECT_VLLM")
    if expected:
        assert vllm.__version__.split("+")[0] == expected


def test_every_reliance_of_the_running_runner_holds_on_the_installed_vllm():
    for name, reliance in fingerprints.RELIANCES().items():
        verdict = checked(reliance)
        assert verdict.holds or name in OTHER_RUNNER, verdict.describe()


def fallbacks(server) -> dict[str, float]:
    return {r: metric(server, "vllm_loglik:fallbacks_total", reason=r) for r in GATES}


def test_both_fast_paths_are_taken_on_the_test_server(server, ref):
    """A scoring request takes the runner's fast path (on V1 its id is in the engine's
    target-only trace) and an echo request is accelerated, with no fallback counted; the
    start-up line says which vLLM and model runner run and that each path is on."""
    import vllm

    client = server.client()
    seen = set(TRACE.read_text().split()) if TRACE.exists() else set()
    echoes = metric(server, "vllm_loglik:echo_requests_total", model=MODEL)
    r = client.completions.create(model=MODEL, prompt="The fast paths.", max_tokens=0,
                                  extra_body={"loglikelihood": True})  # fmt: skip
    (entry,) = entries(r.choices[0])
    ids = [t.token_id for t in entry.content]
    want, _ = ref.token_logprobs([ref.tokenizer.bos_token_id, *ids])
    assert [t.logprob for t in entry.content] == pytest.approx(want, abs=TOL)
    if HAS_V1:
        assert set(TRACE.read_text().split()) - seen  # the engine computed it target-only
    echo = client.completions.create(model=MODEL, prompt="The fast paths, echoed.", max_tokens=1,
                                     echo=True, logprobs=1, temperature=0)  # fmt: skip
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    assert metric(server, "vllm_loglik:echo_requests_total", model=MODEL) == echoes + 1
    assert fallbacks(server) == dict.fromkeys(GATES, 0.0)
    log = Path(server.log_path).read_text()
    version = vllm.__version__.split("+")[0]
    line = re.search(rf"vllm-loglik \(server\) on vLLM {re.escape(version)}: (.*)", log)
    assert line, "no start-up line"
    runner = "model runner: V1" if HAS_V1 else "model runner: V2"
    for path in (runner, "fast prompt logprobs: on", "echo acceleration: on",
                 "prefix-cache reads: on", "corrected word scores: on"):  # fmt: skip
        assert path in line.group(1), line.group(1)


# ---------------------------------------------------------------- a vLLM whose code differs


@pytest.fixture(scope="module")
def changed_server(model_path, tmp_path_factory):
    """The demo model on a vLLM whose runner's fast path (`RUNNER_CHANGE`) and
    `request_output_to_completion_response` (echo acceleration) differ."""
    logs = tmp_path_factory.mktemp("changed-logs")
    env = {
        "PYTHONPATH": with_pythonpath(str(Path(__file__).parent / "changed_vllm")),
        "VLLM_LOGLIK_CHANGED": f"{RUNNER_CHANGE},{TO_RESPONSE}",
        "VLLM_LOGLIK_TARGET_LOGPROBS_TRACE": str(logs / "target-logprobs.txt"),
    }
    srv = Server(model_path, logs / "server.log", True, None, env=env)
    srv.trace = logs / "target-logprobs.txt"
    yield srv
    srv.stop()


def test_a_changed_function_turns_its_fast_path_off_and_is_counted(changed_server, ref):
    srv = changed_server
    log = srv.log_path.read_text()
    # Named in the log, by the API server and by the engine's worker (which does not patch).
    # The relied-on name that holds the changed function (V2's: its worker class).
    change = re.escape(RUNNER_CHANGE if HAS_V1 else RUNNER_CHANGE.rsplit(".", 1)[0])
    assert re.search(rf"fast prompt logprobs: off \([^)]*{change}", log), log[-3000:]
    # On V2 without its verified fields echo has no cache to read, which turns it off first.
    echo_off = re.escape(TO_RESPONSE) if HAS_V1 else "no prefix-cache reads"
    assert re.search(rf"echo acceleration: off \([^)]*{echo_off}", log), log[-3000:]
    assert re.search(rf"no V. patch of [^(]*in this process \([^)]*{change}", log)
    client = srv.client()
    before = fallbacks(srv)
    text, continuations = "The capital of France is", [" Paris", " Rome"]
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0,
                                  extra_body={"loglikelihood": {"continuations": continuations}})  # fmt: skip
    bos = ref.tokenizer.bos_token_id
    for entry in entries(r.choices[0]):
        ids = [t.token_id for t in entry.content]
        context = ref.tokenizer(text)["input_ids"]
        want, _ = ref.token_logprobs(context + ids)
        assert [t.logprob for t in entry.content] == pytest.approx(want[-len(ids):], abs=TOL)
    prompt = "Echo on a vLLM that changed."
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True,
                                     logprobs=1, temperature=0)  # fmt: skip
    ids = ref.tokenizer(prompt)["input_ids"]
    assert ids[0] == bos
    want, _ = ref.token_logprobs(ids)
    got = echo.choices[0].logprobs.token_logprobs[1 : len(ids)]
    assert got == pytest.approx(want, abs=TOL)
    after = fallbacks(srv)
    assert after["prompt_logprobs_path"] - before["prompt_logprobs_path"] >= 2  # 2 continuations
    assert after["echo_path"] - before["echo_path"] == (1 if HAS_V1 else 0)
    if HAS_V1:
        assert after["cache_reads"] == before["cache_reads"]  # the output layouts are unchanged
    else:  # V2 without verified scoring fields reads no cache (vLLM 0.34's would not let it)
        assert after["cache_reads"] - before["cache_reads"] >= 2
    assert metric(srv, "vllm_loglik:echo_requests_total", model=MODEL) == 0
    assert not srv.trace.exists() or not srv.trace.read_text().strip()


def test_a_stock_vllm_version_string_decides_nothing(monkeypatch):
    """Only the code decides: a version string never verified, with the code of a verified
    version, keeps every reliance."""
    import vllm

    monkeypatch.setattr(vllm, "__version__", "9.9.9")
    for name, reliance in fingerprints.RELIANCES().items():
        assert check(reliance).holds or name in OTHER_RUNNER, name


def test_the_offline_api_logs_which_vllm_runs_and_its_fast_paths(llm):
    import logging

    import vllm

    import vllm_loglik
    from vllm_loglik import offline

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.loglik")
    logger.addHandler(handler)
    try:
        fingerprints._reported.discard("offline")  # as in a new process
        offline._scorers.pop(llm, None)
        vllm_loglik.prompt_loglikelihood(llm, ["A start-up line."])
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if "(offline)" in r.getMessage()]
    assert len(lines) == 1, lines
    version = vllm.__version__.split("+")[0]
    assert f"on vLLM {version}:" in lines[0]
    assert "fast prompt logprobs: on" in lines[0] and "prefix-cache reads: on" in lines[0]
    assert ("model runner: V1" if HAS_V1 else "model runner: V2") in lines[0]
    assert "LoRA and base-model requests" in lines[0]  # the test engine has LoRA on

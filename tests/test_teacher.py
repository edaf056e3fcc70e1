"""Teacher and reference logprobs for post-training (`vllm_loglik.teacher`): TRL's
`/get_sequence_logprobs/` on our server in both formats, TRL's own client (`trl` 1.16's
`VLLMClient.get_sequence_logprobs`, on the stock `/v1/completions` path), and the offline
`sequence_logprobs`, each against a transformers forward pass at T = 1 and T = 0.7 (1e-4 per
value; top-k ids equal where the logprobs are not tied), under a LoRA adapter too."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

import vllm_loglik
from vllm_loglik.teacher import decode_binary
from vllm_loglik.testing import with_pythonpath

from .conftest import MAX_MODEL_LEN, Reference, Server, lora_args
from .test_lora import AdapterReference

TOL = 1e-4
K = 5


def groups(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """GRPO-like groups: two prompts (one longer than a KV block, so its context is read from
    the prefix cache) with three completions each of different lengths, a DPO-like pair, a
    prompt length 0 and an empty completion."""
    rng = np.random.default_rng(seed)
    seqs, lengths = [], []
    for plen in (40, 7):
        prompt = rng.integers(3, vocab, plen).tolist()
        for clen in (5, 12, 1):
            seqs.append(prompt + rng.integers(3, vocab, clen).tolist())
            lengths.append(plen)
    seqs.append(rng.integers(3, vocab, 9).tolist())
    lengths.append(0)
    seqs.append(rng.integers(3, vocab, 6).tolist())
    lengths.append(6)
    return seqs, lengths


def reference(ref: Reference, seq: list[int], plen: int, temperature: float):
    """Per completion row of `seq`: the actual token's logprob and the full log-softmax row
    (None for a row with nothing before it)."""
    torch = ref.torch
    with torch.no_grad():
        logits = ref.model(torch.tensor([seq])).logits[0].float()
    lsm = torch.log_softmax(logits / temperature, dim=-1)
    rows = []
    for pos in range(plen, len(seq)):
        if pos == 0:
            rows.append(None)
        else:
            rows.append(lsm[pos - 1])
    return rows


def check_arrays(ref, seqs, lengths, temperature, logprobs, token_ids, actual, actual_ids, lens):
    """The arrays of one answer (`[B, T, k]`, `[B, T]`) against the reference."""
    assert lens == [len(s) - p for s, p in zip(seqs, lengths)]
    for i, (seq, plen) in enumerate(zip(seqs, lengths)):
        for t, row in enumerate(reference(ref, seq, plen, temperature)):
            if row is None:
                assert actual[i][t] == -math.inf and list(token_ids[i][t]) == [0] * K
                continue
            token = seq[plen + t]
            assert actual_ids[i][t] == token
            assert abs(actual[i][t] - row[token].item()) < TOL
            top, ids = row.topk(K + 1)
            assert np.allclose(logprobs[i][t], top[:K].numpy(), atol=TOL)
            for j in range(K):
                tied = any(abs(top[j] - top[m]) < 1e-5 for m in (j - 1, j + 1) if 0 <= m <= K)
                if not tied:
                    assert token_ids[i][t][j] == ids[j].item()
        # Padding past the completion.
        assert all(v == -math.inf for v in np.asarray(actual[i][len(seq) - plen :]).ravel())


@pytest.fixture(scope="module")
def teacher_server(model_path, lora_paths, tmp_path_factory):
    """A teacher server as TRL users run one: the plugin, no API key (TRL's client sends none),
    more top logprobs than vLLM's default cap, and the LoRA adapters."""
    log = tmp_path_factory.mktemp("logs") / "teacher.log"
    srv = Server(model_path, log, True, None,
                 extra_args=["--max-logprobs", "100", *lora_args(lora_paths)])  # fmt: skip
    yield srv
    srv.stop()


def post(server, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + "/get_sequence_logprobs/", json=body, headers=headers, timeout=120)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_route_matches_transformers(teacher_server, ref, temperature, fmt):
    seqs, lengths = groups(ref.model.config.vocab_size)
    r = post(teacher_server, {"sequences": seqs, "prompt_lengths": lengths, "top_logprobs": K,
                              "temperature": temperature, "response_format": fmt})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    if fmt == "binary":
        arrays = decode_binary(body)
        assert body["shape"] == [len(seqs), max(len(s) - p for s, p in zip(seqs, lengths)), K]
        check_arrays(
            ref, seqs, lengths, temperature, arrays["logprobs"], arrays["token_ids"],
            arrays["actual_logprobs"][:, :, 0], arrays["actual_token_ids"][:, :, 0],
            arrays["completion_lengths"],
        )  # fmt: skip
        return
    # json: per row, vLLM's entry sorted by rank: the top k, then the actual token if it is
    # not among them; an empty row where nothing comes before.
    for i, (seq, plen) in enumerate(zip(seqs, lengths)):
        rows = reference(ref, seq, plen, temperature)
        assert len(body["logprobs"][i]) == len(rows) == len(body["logprob_token_ids"][i])
        for t, row in enumerate(rows):
            lps, ids = body["logprobs"][i][t], body["logprob_token_ids"][i][t]
            if row is None:
                assert lps == [] and ids == []
                continue
            token = seq[plen + t]
            top = row.topk(K)
            assert len(ids) == (K if token in ids[:K] else K + 1)
            assert token in ids
            for tid, lp in zip(ids, lps):
                assert abs(lp - row[tid].item()) < TOL
            assert np.allclose(sorted(lps, reverse=True)[:K], top.values.numpy(), atol=TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_client_stock_path(teacher_server, ref, temperature):
    """TRL 1.16's own client, unchanged: it posts `prompt_logprobs` to `/v1/completions`
    (vLLM's own answer) and slices the completion rows out. Right at T = 1; at T = 0.7 vLLM's
    prompt logprobs are the raw ones (T = 1), as `docs/post-training.md` says: the stock path
    stays vLLM's own answer."""
    from trl.generation.vllm_client import VLLMClient

    seqs, lengths = groups(ref.model.config.vocab_size, seed=1)
    seqs, lengths = seqs[:-2], lengths[:-2]  # TRL's slicing has no row for a prompt length 0
    client = VLLMClient(base_url=teacher_server.url)
    out = client.get_sequence_logprobs(seqs, lengths, top_logprobs=K, temperature=temperature)
    lens = [len(r) for r in out["actual_logprobs"]]
    actual = [[a[0] for a in r] for r in out["actual_logprobs"]]
    actual_ids = [[a[0] for a in r] for r in out["actual_token_ids"]]
    pad = max(lens)

    def padded(rows, fill):
        return [r + [fill] * (pad - len(r)) for r in rows]

    check_arrays(
        ref, seqs, lengths, 1.0,
        padded(out["logprobs"], [-math.inf] * K), padded(out["logprob_token_ids"], [0] * K),
        padded(actual, -math.inf), padded(actual_ids, 0), lens,
    )  # fmt: skip


#: TRL 1.10, the last whose client posts to `trl vllm-serve`'s route (`make test` installs it
#: there, beside trl 1.16 in the venv).
TRL_ROUTE_CLIENT = Path(__file__).resolve().parent.parent / ".cache" / "trl-1.10.0"

ROUTE_CLIENT = """
import json, sys
from trl.generation.vllm_client import VLLMClient
url, seqs, lengths, k, t, binary = json.loads(sys.argv[1])
out = VLLMClient(base_url=url).get_sequence_logprobs(seqs, lengths, top_logprobs=k, temperature=t,
                                                     use_binary=binary)
print(json.dumps(out))
"""


@pytest.mark.parametrize(("temperature", "binary"), [(0.7, True), (1.0, False)])
def test_trl_route_client(teacher_server, ref, temperature, binary):
    """TRL 1.10's own client, unchanged, posts to `/get_sequence_logprobs/`: binary at T = 0.7
    (every array), json at T = 1 (its top-k lists: vLLM's entries sorted by rank)."""
    assert (TRL_ROUTE_CLIENT / "trl" / "generation" / "vllm_client.py").exists(), "run make test"
    seqs, lengths = groups(ref.model.config.vocab_size, seed=4)
    args = json.dumps([teacher_server.url, seqs, lengths, K, temperature, binary])
    env = dict(os.environ, PYTHONPATH=with_pythonpath(str(TRL_ROUTE_CLIENT)))
    done = subprocess.run([sys.executable, "-c", ROUTE_CLIENT, args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    lens = [len(r) for r in out["logprobs"]]
    assert lens == [len(s) - p for s, p in zip(seqs, lengths)]
    if not binary:
        for i, (seq, plen) in enumerate(zip(seqs, lengths)):
            for t, row in enumerate(reference(ref, seq, plen, temperature)):
                lps, ids = out["logprobs"][i][t], out["logprob_token_ids"][i][t]
                if row is None:
                    assert lps == [] and ids == []
                    continue
                assert seq[plen + t] in ids and len(ids) in (K, K + 1)
                assert all(abs(lp - row[tid].item()) < TOL for tid, lp in zip(ids, lps))
        return
    pad = max(lens)

    def padded(rows, fill):
        return [r + [fill] * (pad - len(r)) for r in rows]

    check_arrays(
        ref, seqs, lengths, temperature,
        padded(out["logprobs"], [-math.inf] * K), padded(out["logprob_token_ids"], [0] * K),
        padded([[a[0] for a in r] for r in out["actual_logprobs"]], -math.inf),
        padded([[a[0] for a in r] for r in out["actual_token_ids"]], 0), lens,
    )  # fmt: skip


def test_route_under_an_adapter(teacher_server, model_path, lora_paths):
    name = "adapter-a"
    adapter_ref = AdapterReference(model_path, lora_paths[name])
    seqs, lengths = groups(adapter_ref.model.config.vocab_size, seed=2)
    for temperature in (1.0, 0.7):
        r = post(teacher_server, {"sequences": seqs, "prompt_lengths": lengths, "top_logprobs": K,
                                  "temperature": temperature, "response_format": "binary",
                                  "model": name})  # fmt: skip
        assert r.status_code == 200, r.text
        a = decode_binary(r.json())
        check_arrays(
            adapter_ref, seqs, lengths, temperature, a["logprobs"], a["token_ids"],
            a["actual_logprobs"][:, :, 0], a["actual_token_ids"][:, :, 0], a["completion_lengths"],
        )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"sequences": [[5, 6, 7]], "prompt_lengths": [1, 2]}, "sequences", "same length"),
        ({"sequences": [[5, 6, 7]], "prompt_lengths": [4]}, "prompt_lengths", "prompt_lengths[0]"),
        ({"sequences": [[5, 6, 7]], "prompt_lengths": [-1]}, "prompt_lengths", "out of range"),
        ({"sequences": [[5] * MAX_MODEL_LEN], "prompt_lengths": [1]}, "sequences", "max_model_len"),
        ({"sequences": [[5, 6, 10**9]], "prompt_lengths": [1]}, "sequences", "sequences[0][2]"),
        ({"sequences": [[5, 6, 7]], "prompt_lengths": [1], "top_logprobs": 101}, "top_logprobs", "--max-logprobs"),
        ({"sequences": [[5, 6, 7]], "prompt_lengths": [1], "temperature": 0}, "temperature", "greater than 0"),
        ({"sequences": [[5, 6, 7]], "prompt_lengths": [1], "response_format": "xml"}, "response_format", "response_format"),
        ({"sequences": [[5, 6, 7]], "prompt_lengths": [1], "images": []}, "images", "not a field"),
        ({"sequences": [["5", 6]], "prompt_lengths": [1]}, "sequences", "sequences[0][0]"),
        ({"prompt_lengths": [1]}, "sequences", "required"),
        ({"sequences": [[]], "prompt_lengths": [0]}, "sequences", "must not be empty"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_the_field(teacher_server, body, param, needle):
    r = post(teacher_server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


def test_unknown_model_is_vllms_404_and_the_server_goes_on(teacher_server):
    r = post(teacher_server, {"sequences": [[5, 6, 7]], "prompt_lengths": [1], "model": "nope"})
    assert r.status_code == 404, r.text
    r = post(teacher_server, {"sequences": [[5, 6, 7]], "prompt_lengths": [1], "top_logprobs": 0})
    assert r.status_code == 200 and len(r.json()["logprobs"][0]) == 2


def test_route_is_guarded_by_the_servers_api_key(server):
    from .conftest import API_KEY

    body = {"sequences": [[5, 6, 7]], "prompt_lengths": [1], "top_logprobs": 2}
    assert post(server, body).status_code == 401
    r = post(server, body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_offline_matches_transformers(llm, ref, temperature):
    seqs, lengths = groups(ref.model.config.vocab_size, seed=3)
    out = vllm_loglik.sequence_logprobs(
        llm, seqs, lengths, top_logprobs=K, temperature=temperature
    )
    check_arrays(
        ref, seqs, lengths, temperature, out.logprobs, out.token_ids, out.actual_logprobs,
        out.actual_token_ids, out.completion_lengths,
    )  # fmt: skip
    # The actual token's rank, as vLLM counts it (ties count as higher).
    for i, (seq, plen) in enumerate(zip(seqs, lengths)):
        for t, row in enumerate(reference(ref, seq, plen, temperature)):
            if row is not None:
                assert out.ranks[i][t] == int((row >= row[seq[plen + t]]).sum())


def test_offline_bad_input_is_a_value_error(llm):
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\]"):
        vllm_loglik.sequence_logprobs(llm, [[5, 6]], [3])
    with pytest.raises(ValueError, match="max_logprobs"):
        vllm_loglik.sequence_logprobs(llm, [[5, 6]], [1], top_logprobs=21)
    with pytest.raises(ValueError, match="temperature"):
        vllm_loglik.sequence_logprobs(llm, [[5, 6]], [1], temperature=-1)


# ------------------------------------------------- the field: token-id continuations as arrays


def check_entry_arrays(ref, prompt, continuation, arrays, temperature, k):
    """One entry's `arrays` (decoded) against the reference over prompt + continuation."""
    seq = prompt + continuation
    rows = reference(ref, seq, len(prompt), temperature)
    assert list(arrays["token_ids"]) == continuation
    for t, row in enumerate(rows):
        token = continuation[t]
        assert abs(arrays["logprobs"][t] - row[token].item()) < TOL
        assert arrays["ranks"][t] == int((row >= row[token]).sum())
        top, ids = row.topk(k + 1)
        assert np.allclose(arrays["top_logprobs"][t], top[:k].numpy(), atol=TOL)
        for j in range(k):
            if all(abs(top[j] - top[m]) >= 1e-5 for m in (j - 1, j + 1) if 0 <= m <= k):
                assert arrays["top_token_ids"][t][j] == ids[j].item()


def test_field_arrays_at_a_temperature(teacher_server, ref):
    """`loglikelihood.continuations` of token ids with `content: "arrays"`, more alternatives
    than vLLM's default cap of 20 (this server's --max-logprobs is 100), at T = 0.7."""
    from vllm_loglik.protocol import decode_arrays, entries

    seqs, lengths = groups(ref.model.config.vocab_size, seed=5)
    prompt = seqs[0][: lengths[0]]
    continuations = [s[lengths[0] :] for s in seqs[:3]]
    k = 30
    client = teacher_server.client()
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": continuations, "content": "arrays",
                                      "top_logprobs": k, "temperature": 0.7}},
    )  # fmt: skip
    scored = entries(response.choices[0])
    assert [e.content for e in scored] == [None] * 3
    for entry, continuation in zip(scored, continuations, strict=True):
        arrays = decode_arrays(entry)
        check_entry_arrays(ref, prompt, continuation, arrays, 0.7, k)
        assert abs(entry.logprob - float(arrays["logprobs"].astype(np.float64).sum())) < 1e-3
        assert entry.num_tokens == len(continuation)


@pytest.mark.parametrize(
    ("options", "param", "needle"),
    [
        ({"continuations": [[5, 6]], "top_logprobs": 101}, "loglikelihood.top_logprobs", "--max-logprobs"),
        ({"temperature": 0.5, "words": True}, "loglikelihood.temperature", "words"),
        ({"temperature": 0}, "body.loglikelihood", "loglikelihood.temperature"),
        ({"content": "tables"}, "body.loglikelihood", "loglikelihood.content"),
    ],
)  # fmt: skip
def test_field_bad_options_are_400s(teacher_server, options, param, needle):
    r = httpx.post(teacher_server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 0, "loglikelihood": options})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


def test_offline_tokens_as_arrays_at_a_temperature(llm, ref):
    seqs, lengths = groups(ref.model.config.vocab_size, seed=6)
    prompt = seqs[0][: lengths[0]]
    pairs = [(prompt, s[lengths[0] :]) for s in seqs[:3]]
    scores = vllm_loglik.loglikelihood_tokens(
        llm, pairs, top_logprobs=K, temperature=0.7, arrays=True
    )
    for score, (ctx, cont) in zip(scores, pairs, strict=True):
        assert score.tokens == [] and score.num_tokens == len(cont)
        a = score.arrays
        arrays = {"token_ids": a.token_ids, "logprobs": a.logprobs, "ranks": a.ranks,
                  "top_token_ids": a.top_token_ids, "top_logprobs": a.top_logprobs}  # fmt: skip
        check_entry_arrays(ref, ctx, cont, arrays, 0.7, K)


def test_batch_engine_loop_writes_arrays(llm, ref):
    """The batch CLI's engine loop (what `vllm-loglik score` runs in process) on lines that ask
    for arrays: DPO's reference logprobs of a dataset, precomputed."""
    from vllm_loglik import batch
    from vllm_loglik.protocol import decode_arrays

    seqs, lengths = groups(ref.model.config.vocab_size, seed=7)
    prompt = seqs[0][: lengths[0]]
    chosen, rejected = seqs[0][lengths[0] :], seqs[1][lengths[0] :]
    lines = [json.dumps({"id": "pair-1", "prompt": prompt, "loglikelihood": {
        "continuations": [chosen, rejected], "content": "arrays", "top_logprobs": 3}})]  # fmt: skip
    lines.append(json.dumps({"id": "bad", "prompt": prompt, "loglikelihood": {
        "continuations": [chosen], "content": "arrays", "top_logprobs": 21}}))  # fmt: skip
    records: list[dict] = []
    batch.run_engine(llm, iter(enumerate(lines, 1)), records.append, details=False)
    good, bad = sorted(records, key=lambda r: r["line"])
    assert good["id"] == "pair-1"
    for entry, cont in zip(good["loglikelihood"], (chosen, rejected), strict=True):
        check_entry_arrays(ref, prompt, cont, decode_arrays(entry), 1.0, 3)
    assert bad["error"]["param"] == "loglikelihood.top_logprobs"
    assert "max_logprobs" in bad["error"]["message"]


def test_v2_wrapper_keeps_vllms_rows_scales_and_skips_the_rest():
    """`v2_scoring._kept_rows` selects the rows that V2's `compute_prompt_logprobs` keeps, and
    `_Scaled` computes the LM head over those only, divided by a request's temperature: on a
    hand-made step of three requests (one without prompt logprobs, one chunked, one from a
    `prompt_logprob_start` past a cached context)."""
    from types import SimpleNamespace

    import torch

    from vllm_loglik import v2_scoring

    # Request 0: 5 rows, no prompt logprobs. Request 1: a prompt of 10, 4 computed, 6 scheduled
    # (its last chunk), start 2. Request 2: a prompt of 20, 0 computed, 8 scheduled (chunked),
    # start 5.
    worker = SimpleNamespace(
        uses_prompt_logprobs=np.array([False, True, True]),
        prompt_logprob_start=np.array([0, 2, 5], dtype=np.int32),
    )
    batch = SimpleNamespace(
        idx_mapping_np=np.array([0, 1, 2]), req_ids=["a", "b", "c"], num_tokens=19,
        num_computed_prefill_tokens_np=np.array([0, 4, 0]),
        num_scheduled_tokens=np.array([5, 6, 8]), prefill_len_np=np.array([5, 10, 20]),
        query_start_loc_np=np.array([0, 5, 11, 19]),
    )  # fmt: skip
    kept = v2_scoring._kept_rows(worker, batch, np.array([6, 10, 20]))
    want = np.zeros(19, dtype=bool)
    want[5:10] = True  # b: rows 4..8 of its prompt (the last, row 9, predicts the first output)
    want[16:19] = True  # c: from its start (5) on, all of the chunk
    assert (kept == want).all()

    weight = torch.randn(7, 3)
    calls = []

    def logits_fn(h):
        calls.append(h.shape[0])
        return h @ weight.T

    hidden = torch.randn(24, 3)
    step = hidden[:19]
    rows = v2_scoring._temperature_rows({"c": 0.5}, batch)
    scaled = v2_scoring._Scaled(logits_fn, hidden, rows, kept)
    out = torch.cat([scaled(step[a : a + 8]) for a in range(0, 19, 8)])
    full = step @ weight.T
    assert torch.allclose(out[5:10], full[5:10])
    assert torch.allclose(out[16:19], full[16:19] / 0.5)
    assert (out[~torch.as_tensor(want)] == 0).all()
    assert sum(calls) == want.sum() and not scaled.lost
    scaled(step[3:9].clone())  # not a view of the step: computed whole
    assert scaled.lost


def test_a_long_answer_is_gzipped_for_a_client_that_accepts_it(teacher_server):
    """The binary answer of 8 sequences × 60 rows × 100 alternatives (about 640 KB) travels
    gzipped to a client that accepts gzip (httpx, and TRL's `requests`), as it is to one that
    does not; both decode to the same arrays."""
    rng = np.random.default_rng(8)
    prompt = rng.integers(3, 500, 8).tolist()
    seqs = [prompt + rng.integers(3, 500, 60).tolist() for _ in range(8)]
    body = {"sequences": seqs, "prompt_lengths": [8] * 8, "top_logprobs": 100,
            "response_format": "binary"}  # fmt: skip
    zipped = post(teacher_server, body, headers={"Accept-Encoding": "gzip"})
    plain = post(teacher_server, body, headers={"Accept-Encoding": "identity"})
    assert zipped.status_code == plain.status_code == 200, zipped.text
    assert zipped.headers["content-encoding"] == "gzip" and "content-encoding" not in plain.headers
    assert zipped.num_bytes_downloaded < 0.75 * plain.num_bytes_downloaded
    a, b = decode_binary(zipped.json()), decode_binary(plain.json())
    assert (a["token_ids"] == b["token_ids"]).all() and np.allclose(a["logprobs"], b["logprobs"])

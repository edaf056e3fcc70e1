"""Every tokenizer family that users serve, scored exactly, offline and on the server.

Three models, each with a real engine and a real server (one per family for the module):
the byte-level BPE demo model, a Llama model with Mistral 7B v0.1's SentencePiece tokenizer as
a transformers tokenizer and Llama 2's `[INST]` chat template, and a Mistral model with Tekken
under `tokenizer_mode="mistral"` (both tokenizers from `mistral_common/data/`). Every number is
checked in float32 against a transformers forward pass over the ids that the family's own
tokenizer gives the whole text (mistral-common's own encodings for Tekken), 1e-4 per token.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

import vllm_loglik
from vllm_loglik.protocol import entries

from .conftest import API_KEY, MAX_MODEL_LEN, Reference, Server, default_processes

TOL = 1e-4
FAMILIES = ("bpe", "sentencepiece", "tekken")

PAIRS = [
    ("The capital of France is", " Paris"),  # a leading space
    ("The answer is", "42"),  # no space
    ("東京は日本の", "首都です。"),  # text without spaces
    ("Emoji:", " 🙂 𝔘𝔫𝔦 ☕"),  # characters outside the vocabulary: byte tokens
    ("", "Hello world"),  # an empty context: BOS alone
    ("Hello", " said Ωμέγα. In the morning"),
    ("Q: A ", "B"),  # the context's trailing space moves to the continuation
]
PROMPT = " said Ωμέγα. In the morning, the capital of France is Paris."
ROLLING = " ".join(["A long text, scored in several windows: Ωμέγα, 東京, 🙂."] * 14)
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "In the morning, Paris."},
]
CANDIDATES = ["Paris.", "It is Rome, I think.", "Ωμέγα 🙂"]


@dataclass
class Family:
    """One tokenizer family: its model, engine, server, and reference encodings."""

    name: str
    path: Path
    llm: Any
    server: Server
    ref: Reference
    hf: Any  # the transformers tokenizer (None for Tekken)
    mistral: Any  # mistral-common's MistralTokenizer (Tekken only)

    def encode(self, text: str, special: bool = True) -> list[int]:
        if self.mistral is not None:
            raw = self.mistral.instruct_tokenizer.tokenizer
            return raw.encode(text, bos=special, eos=False)
        return self.hf.encode(text, add_special_tokens=special)

    def chat(self, messages: list[dict[str, str]]) -> tuple[list[int], int]:
        """The ids of a conversation and the index of the final message's first token, from
        the family's own tokenizer: transformers' template and offsets, or mistral-common's
        encoding (the final assistant message: its content and `</s>`)."""
        content = messages[-1]["content"]
        if self.mistral is not None:
            from mistral_common.protocol.instruct.request import ChatCompletionRequest

            raw = self.mistral.instruct_tokenizer.tokenizer
            if messages[-1]["role"] == "assistant":
                head = self.mistral.encode_chat_completion(
                    ChatCompletionRequest.from_openai(messages[:-1])
                ).tokens
                return head + raw.encode(content, bos=False, eos=False) + [raw.eos_id], len(head)
            ids = self.mistral.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens
            inst = raw.get_control_token("[INST]")
            return ids, max(i for i, t in enumerate(ids) if t == inst) + 1
        text = self.hf.apply_chat_template(messages, tokenize=False)
        head = self.hf.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=messages[-1]["role"] == "assistant"
        ) if len(messages) > 1 else ""  # fmt: skip
        at = text.find(content.strip(), len(head))
        encoded = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        start = next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > at)
        return encoded["input_ids"], start


def _server(path: Path, log: Path, extra: list[str]) -> Server:
    return Server(str(path), log, True, API_KEY, extra_args=extra)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    from vllm import LLM

    from vllm_loglik import testing

    name = request.param
    if name == "bpe":  # the session's demo model, engine and server
        path = Path(request.getfixturevalue("model_path"))
        yield Family(name, path, request.getfixturevalue("llm"),
                     request.getfixturevalue("server"), request.getfixturevalue("ref"),
                     request.getfixturevalue("ref").tokenizer, None)  # fmt: skip
        return
    root = tmp_path_factory.mktemp(name)
    mode: list[str] = []
    mistral = None
    if name == "sentencepiece":
        path = testing.build_sentencepiece_model(root / "model")
    else:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        path = testing.build_tekken_model(root / "model")
        mode = ["--tokenizer-mode", "mistral"]
        mistral = MistralTokenizer.from_file(str(path / "tekken.json"))
    # The server starts while the engine is built: much of each start-up is single-threaded.
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(_server, path, root / "server.log", mode)
        with default_processes():
            llm = LLM(str(path), dtype="float32", max_model_len=MAX_MODEL_LEN,
                      enforce_eager=True, seed=0, block_size=32,
                      tokenizer_mode="mistral" if mode else "auto")  # fmt: skip
        server = starting.result()
    ref = Reference(str(path), tokenizer=mistral is None)
    try:
        yield Family(name, path, llm, server, ref, ref.tokenizer, mistral)
    finally:
        server.stop()
        llm.llm_engine.engine_core.shutdown()


def joined(score) -> bytes:
    return b"".join(bytes(t.bytes) for t in score.tokens)


def check(family: Family, ids: list[int], start: int, score) -> None:
    """`score` holds `ids[start:]`, with transformers' logprobs and greedy flag."""
    assert score.token_ids == ids[start:]
    expected, greedy = family.ref.score(ids, start)
    got = [t.logprob for t in score.tokens]
    assert got == pytest.approx(expected, abs=TOL)
    assert score.logprob == pytest.approx(sum(expected), abs=TOL * len(expected))
    assert score.is_greedy == greedy


def expected_pair(family: Family, context: str, continuation: str) -> tuple[list[int], list[int] | None]:
    """lm-eval's split on the family's own tokenizer: the context's ids, and the
    continuation's (`whole[len(ctx):]`), or None where BPE merged across the boundary."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return [family.encode("")[0]], family.encode(continuation, special=False)
    ctx, whole = family.encode(stripped), family.encode(stripped + continuation)
    return ctx, whole[len(ctx) :] if whole[: len(ctx)] == ctx else None


def test_continuations_offline(family):
    scores = vllm_loglik.loglikelihood(family.llm, PAIRS)
    for (context, continuation), score in zip(PAIRS, scores, strict=True):
        ctx, cont = expected_pair(family, context, continuation)
        if cont is not None:  # lm-eval's rule: the whole text's tokens
            assert score.token_ids == cont, (context, continuation)
        check(family, ctx + score.token_ids, len(ctx), score)
        moved = context[len(context.rstrip()):] + continuation
        assert joined(score) == moved.encode(), (context, continuation)
        for t in score.tokens:  # a character split between tokens shows as U+FFFD
            assert t.token == bytes(t.bytes).decode("utf-8", errors="replace")


def test_whole_prompt_text_and_token_ids_offline(family):
    ids = family.encode(PROMPT)
    text_score, ids_score = vllm_loglik.prompt_loglikelihood(family.llm, [PROMPT, ids])
    check(family, ids, 1, text_score)
    check(family, ids, 1, ids_score)
    # Every word keeps its leading space; the first token's dummy prefix is not in the text.
    assert joined(text_score) == PROMPT.encode() and text_score.text == PROMPT


def test_rolling_offline(family):
    from vllm_loglik.spans import get_rolling_token_windows, make_disjoint_window

    [score] = vllm_loglik.loglikelihood_rolling(family.llm, [ROLLING], top_logprobs=2)
    tokens = family.encode(ROLLING, special=False)
    assert score.token_ids == tokens
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        tokens, family.encode("")[0], MAX_MODEL_LEN - 2, 1)]  # fmt: skip
    assert len(windows) > 1
    at = 0
    for ctx, pred in windows:
        expected, _ = family.ref.score(ctx + pred, len(ctx))
        got = [t.logprob for t in score.tokens[at : at + len(pred)]]
        assert got == pytest.approx(expected, abs=TOL)
        at += len(pred)
    assert joined(score) == ROLLING.encode()


def test_chat_last_message_and_candidates_offline(family):
    [last] = vllm_loglik.chat_loglikelihood(family.llm, [CHAT])
    ids, start = family.chat(CHAT)
    check(family, ids, start, last)
    [user_last] = vllm_loglik.chat_loglikelihood(family.llm, [CHAT[:1]])
    ids, start = family.chat(CHAT[:1])
    check(family, ids, start, user_last)
    [options] = vllm_loglik.chat_loglikelihood(family.llm, [CHAT[:1]], candidates=[CANDIDATES])
    for text, score in zip(CANDIDATES, options, strict=True):
        ids, start = family.chat(CHAT[:1] + [{"role": "assistant", "content": text}])
        check(family, ids, start, score)


def test_token_id_continuations_equal_native_prompt_logprobs(family):
    from vllm import SamplingParams, TokensPrompt

    prompt = family.encode("The capital of France is")
    responses = [family.encode(text, special=False) for text in (" Paris.", " Ωμέγα 🙂", "42")]
    scores = vllm_loglik.loglikelihood_tokens(family.llm, [(prompt, r) for r in responses])
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    native = family.llm.generate(
        [TokensPrompt(prompt_token_ids=prompt + r) for r in responses], params, use_tqdm=False
    )
    for r, score, out in zip(responses, scores, native, strict=True):
        assert score.token_ids == r
        rows = out.prompt_logprobs[len(prompt) :]
        assert [t.logprob for t in score.tokens] == pytest.approx(
            # The same engine, the same logits; float32 sums over other shapes (a cached
            # context's tail, another batch) differ in the last bits: 1.9e-6 on -15.4 seen here.
            [row[t].logprob for row, t in zip(rows, r, strict=True)], abs=1e-5
        )
        check(family, prompt + r, len(prompt), score)
    with pytest.raises(ValueError, match=r"requests\[1\]: continuation\[1\] is token id"):
        vllm_loglik.loglikelihood_tokens(family.llm, [(prompt, [5]), (prompt, [5, 10**7])])


# The server: the same numbers as the offline API, through the openai client.


def _entries(response) -> list:
    return entries(response.choices[0])


def test_server_completions_every_mode(family):
    client = family.server.client()
    for context, continuation in PAIRS[:4]:
        r = client.completions.create(
            model="tiny", prompt=context, max_tokens=0,
            extra_body={"loglikelihood": {"continuations": [continuation]}},
        )  # fmt: skip
        [offline] = vllm_loglik.loglikelihood(family.llm, [(context, continuation)])
        [entry] = _entries(r)
        assert [t.token_id for t in entry.content] == offline.token_ids
        assert [t.logprob for t in entry.content] == pytest.approx(
            [t.logprob for t in offline.tokens], abs=TOL
        )
        assert b"".join(bytes(t.bytes) for t in entry.content) == continuation.encode()
    ids = family.encode(PROMPT)
    for prompt in (PROMPT, ids):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0,
                                      extra_body={"loglikelihood": True})  # fmt: skip
        [entry] = _entries(r)
        expected, greedy = family.ref.score(ids, 1)
        assert [t.logprob for t in entry.content] == pytest.approx(expected, abs=TOL)
        assert entry.is_greedy == greedy
        [offline] = vllm_loglik.prompt_loglikelihood(family.llm, [prompt])
        assert [bytes(t.bytes) for t in entry.content] == [bytes(t.bytes) for t in offline.tokens]
    # A text prompt's bytes are its text; token ids have none to compare with (on SentencePiece
    # the first word's `▁` is read as the dummy prefix, as the tokenizer decodes them).
    assert b"".join(bytes(t.bytes) for t in _entries(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=0, extra_body={"loglikelihood": True}))[0].content
    ) == PROMPT.encode()  # fmt: skip
    r = client.completions.create(model="tiny", prompt=ROLLING, max_tokens=0,
                                  extra_body={"loglikelihood": {"scope": "rolling"}})  # fmt: skip
    [entry] = _entries(r)
    [offline] = vllm_loglik.loglikelihood_rolling(family.llm, [ROLLING])
    assert [t.token_id for t in entry.content] == offline.token_ids
    assert entry.logprob == pytest.approx(offline.logprob, abs=TOL * offline.num_tokens)


def test_server_chat_last_message_and_candidates(family):
    client = family.server.client()
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=0,
        extra_body={"loglikelihood": {"scope": "last_message"}},
    )  # fmt: skip
    [entry] = _entries(r)
    ids, start = family.chat(CHAT)
    expected, greedy = family.ref.score(ids, start)
    assert [t.token_id for t in entry.content] == ids[start:]
    assert [t.logprob for t in entry.content] == pytest.approx(expected, abs=TOL)
    assert entry.is_greedy == greedy
    r = client.chat.completions.create(
        model="tiny", messages=CHAT[:1], max_tokens=0,
        extra_body={"loglikelihood": {"continuations": CANDIDATES}},
    )  # fmt: skip
    for text, entry in zip(CANDIDATES, _entries(r), strict=True):
        ids, start = family.chat(CHAT[:1] + [{"role": "assistant", "content": text}])
        assert [t.token_id for t in entry.content] == ids[start:]
        expected, _ = family.ref.score(ids, start)
        assert entry.logprob == pytest.approx(sum(expected), abs=TOL * len(expected))


def test_server_token_id_continuations(family):
    client = family.server.client()
    prompt = family.encode("The capital of France is")
    responses = [family.encode(text, special=False) for text in (" Paris.", " Ωμέγα 🙂")]
    expected = vllm_loglik.loglikelihood_tokens(family.llm, [(prompt, r) for r in responses])
    for sent in (prompt, "The capital of France is"):  # token ids or text: the same tokens
        r = client.completions.create(
            model="tiny", prompt=sent, max_tokens=0,
            extra_body={"loglikelihood": {"continuations": responses + ["x"]}},
        )  # fmt: skip
        got = _entries(r)
        for entry, offline in zip(got, expected, strict=False):
            assert [t.token_id for t in entry.content] == offline.token_ids
            assert entry.logprob == pytest.approx(offline.logprob, abs=TOL * offline.num_tokens)
        assert got[2].text == "x"
    bad = httpx.post(
        family.server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": "tiny", "prompt": prompt, "max_tokens": 0,
              "loglikelihood": {"continuations": [[5], [7, 10**7]]}},
    )  # fmt: skip
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "loglikelihood.continuations[1][1]"
    assert family.server.alive()


# The other paths: the batch CLI, and lm-eval in process and through the server.


def test_batch_cli_under_mistral_tokenizer_mode(family, tmp_path):
    """`vllm-loglik score` against a `--tokenizer-mode mistral` server: every mode of the batch
    CLI's mixed file, with the offline API's numbers. (With an engine in its own process, the
    CLI scores through the offline API's `Scorer`, which the tests above run on this model.)"""
    from .test_batch import BAD, check_output, read, score, write_input

    if family.name != "tekken":
        pytest.skip("tokenizer_mode=mistral only; tests/test_batch.py runs the demo model")
    expected = write_input(tmp_path / "in.jsonl")
    run = score(["--server", family.server.url, "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl")])  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]  # the bad lines failed, and the run went on
    assert f"{len(BAD)} lines failed" in run.stderr
    # A bad line's message is the server's own here; the good lines carry the numbers.
    expected = [(body, None if error is None else "") for body, error in expected]
    check_output(read(tmp_path / "out.jsonl"), expected, family.llm)


@pytest.fixture(scope="module")
def vllm_dist_env(tmp_path_factory) -> dict[str, str]:
    from vllm_loglik.testing import lm_eval_vllm_env

    return lm_eval_vllm_env(tmp_path_factory.mktemp("vllm-dist"))


@pytest.mark.soak  # three lm-eval runs, each with its engine
def test_lm_eval_in_process_and_through_the_server(family, tmp_path, vllm_dist_env):
    """`vllm-loglik-offline` against lm-eval's own `--model vllm` with the same `--model_args`
    (`tokenizer_mode=mistral` for Tekken): the same requests and per-sample numbers. And, for
    Tekken, `vllm-loglik` through the family's server: each request as the offline API scores
    it (the server adds BOS to a context as vLLM encodes a prompt string, and no BOS to a rolling
    text; lm-eval's in-process models follow the tokenizer's default, which adds BOS to both).
    The runs go side by side: each is mostly start-up."""
    from .lm_eval_runs import assert_same, lm_eval, loglikelihoods, side_by_side
    from .test_lm_eval_offline import model_args

    if family.name == "bpe":
        pytest.skip("the demo model: tests/test_lm_eval_offline.py and tests/test_lm_eval.py")
    args = model_args(str(family.path), "tokenizer_mode=mistral" if family.mistral else "")
    tasks = ["--tasks", "loglik_mc,loglik_rolling", "--batch_size", "auto"]
    served_args = f"base_url={family.server.url}/v1/completions,model=tiny"
    runs = [(["--model", "vllm-loglik-offline", "--model_args", args, *tasks], tmp_path / "ours", None),
            (["--model", "vllm", "--model_args", args, *tasks], tmp_path / "theirs", vllm_dist_env)]
    if family.mistral is not None:  # the server's tokenizer path is the same code for the others
        runs.append((["--model", "vllm-loglik", "--model_args", served_args, *tasks],
                     tmp_path / "served", None))  # fmt: skip
    results = [out[1] for out in side_by_side(*(partial(lm_eval, *run) for run in runs))]
    ours, theirs = results[:2]
    for task in ("loglik_mc", "loglik_rolling"):
        assert_same(ours, theirs, task)
    if family.mistral is None:
        return
    served = results[2]
    for sample in served["loglik_rolling"]:
        [want] = vllm_loglik.loglikelihood_rolling(family.llm, [sample["doc"]["text"]])
        assert loglikelihoods(sample) == pytest.approx([want.logprob], abs=TOL * want.num_tokens)
    for sample in served["loglik_mc"]:
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        want = [s.logprob for s in vllm_loglik.loglikelihood(family.llm, pairs)]
        assert loglikelihoods(sample) == pytest.approx(want, abs=TOL * 8)


# Word scores (tests/words_reference.py): every mode, offline and on the server, on each family.

#: Leading and trailing whitespace, double spaces, a tab, a newline, digits, emoji, CJK (one run,
#: no spaces), quotes and punctuation attached to their words.
WORDS_TEXT = '  "Why?" she asked.  The  answer:\t42 apples,\nthen 🙂 and 東京の空. Ωμέγα end.  '
#: Words separated by single spaces (for the invariants).
PLAIN_TEXT = "The capital of France is Paris and the river is wide"
WORD_PAIRS = PAIRS + [("She said", " unbelievable things,  twice.\n")]
_B: dict[str, set[int]] = {}


def boundary(family: Family) -> set[int]:
    from .words_reference import boundary_ids

    if family.name not in _B:
        _B[family.name] = boundary_ids(family, family.ref.model.config.vocab_size)
    return _B[family.name]


def ref_rows(family: Family, ids: list[int], start: int):
    from .words_reference import rows

    return rows(family, ids, start, boundary(family))


def expected_words(family: Family, score, r, corrected: bool = True, offsets=None):
    from .words_reference import piece_reader, words

    return words(score.text, score.token_ids, [bytes(t.bytes) for t in score.tokens], r,
                 boundary(family), piece_reader(family), corrected, offsets)  # fmt: skip


def check_words(got, expected) -> None:
    """Each word's text, offset, tokens and numbers against the reference, within 1e-4."""
    assert [(w.text, w.offset, w.num_tokens) for w in got] == [
        (w.text, w.offset, w.num_tokens) for w in expected
    ]
    assert [w.logprob for w in got] == pytest.approx([w.logprob for w in expected], abs=TOL)
    assert [w.tokens_logprob for w in got] == pytest.approx(
        [w.tokens_logprob for w in expected], abs=TOL
    )
    assert all(w.logprob <= 1e-6 for w in got)  # a word's probability is at most 1


def rolling_rows(family: Family, text: str):
    from vllm_loglik.spans import get_rolling_token_windows, make_disjoint_window

    from .words_reference import join

    tokens = family.encode(text, special=False)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        tokens, family.encode("")[0], MAX_MODEL_LEN - 2, 1)]  # fmt: skip
    assert len(windows) > 1
    return join([ref_rows(family, ctx + pred, len(ctx)) for ctx, pred in windows])


def test_words_offline_every_mode(family):
    llm = family.llm
    # The prompt (text and token ids), corrected and as plain sums.
    ids = family.encode(WORDS_TEXT)
    r = ref_rows(family, ids, 1)
    for prompt in (WORDS_TEXT, ids):
        for kind in ("corrected", "tokens"):
            [score] = vllm_loglik.prompt_loglikelihood(
                llm, [prompt], words=True, word_probability=kind
            )
            check_words(score.words, expected_words(family, score, r, kind == "corrected"))
            assert score.words_left_out == 0
    assert [w.text for w in score.words] == WORDS_TEXT.split()
    # Token ids without BOS: the first word's first token has no logprob, so it is left out.
    plain = family.encode("Hello world, again.", special=False)
    [score] = vllm_loglik.prompt_loglikelihood(llm, [plain], words=True)
    expected = expected_words(family, score, ref_rows(family, plain, 1))
    if not score.text[:1].isspace():  # the rest of the first word, after its first token
        expected = expected[1:]
    check_words(score.words, expected)
    assert score.words_left_out == 1 and score.words[-1].text == "again."
    # Continuations, given their contexts.
    for (context, continuation), score in zip(
        WORD_PAIRS, vllm_loglik.loglikelihood(llm, WORD_PAIRS, words=True), strict=True
    ):
        ctx, _ = expected_pair(family, context, continuation)
        r = ref_rows(family, ctx + score.token_ids, len(ctx))
        check_words(score.words, expected_words(family, score, r))
        assert [w.text for w in score.words] == continuation.split(), (context, continuation)
    # A rolling document, in windows: P_B after a window's last token is its own row's.
    [score] = vllm_loglik.loglikelihood_rolling(llm, [ROLLING], words=True)
    check_words(score.words, expected_words(family, score, rolling_rows(family, ROLLING)))
    assert len(score.words) == len(ROLLING.split())
    # The last chat message, and candidates.
    [score] = vllm_loglik.chat_loglikelihood(llm, [CHAT], words=True)
    ids, start = family.chat(CHAT)
    check_words(score.words, expected_words(family, score, ref_rows(family, ids, start)))
    assert [w.text for w in score.words] == CHAT[-1]["content"].split()
    [options] = vllm_loglik.chat_loglikelihood(llm, [CHAT[:1]], candidates=[CANDIDATES], words=True)
    for text, score in zip(CANDIDATES, options, strict=True):
        ids, start = family.chat(CHAT[:1] + [{"role": "assistant", "content": text}])
        check_words(score.words, expected_words(family, score, ref_rows(family, ids, start)))
    # Token-id continuations: their text's words.
    prompt = family.encode("The capital of France is")
    cont = family.encode(" Paris, Ωμέγα 🙂.", special=False)
    [score] = vllm_loglik.loglikelihood_tokens(llm, [(prompt, cont)], words=True)
    check_words(score.words, expected_words(family, score, ref_rows(family, prompt + cont, len(prompt))))


def test_words_own_offsets_and_invariants(family):
    llm = family.llm
    # The user's own words: offsets into the text (here: each word and what follows it, up to
    # the next word; a token may run on into whitespace).
    spans = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", PLAIN_TEXT)]
    [score] = vllm_loglik.loglikelihood(llm, [("Q:", " " + PLAIN_TEXT)], words=[[(s + 1, e + 1) for s, e in spans]])
    ctx, _ = expected_pair(family, "Q:", " " + PLAIN_TEXT)
    r = ref_rows(family, ctx + score.token_ids, len(ctx))
    check_words(score.words, expected_words(family, score, r, offsets=[(s + 1, e + 1) for s, e in spans]))
    # With `tokens`, the words sum to the tokens' sum when no whitespace token sits between them.
    [plain] = vllm_loglik.prompt_loglikelihood(llm, [PLAIN_TEXT], words=True, word_probability="tokens")
    if all(t.token.strip() for t in plain.tokens):
        assert sum(w.logprob for w in plain.words) == pytest.approx(plain.logprob, abs=TOL)
        assert sum(w.num_tokens for w in plain.words) == plain.num_tokens
    # Corrected, on single spaces, the sum telescopes: the tokens' sum, plus the last word's
    # log P_B(after), less the first word's log P_before.
    [fixed] = vllm_loglik.prompt_loglikelihood(llm, [PLAIN_TEXT], words=True)
    ids = family.encode(PLAIN_TEXT)
    r = ref_rows(family, ids, 1)
    first = r.before[0] if ids[1] in boundary(family) else math.log(-math.expm1(r.before[0]))
    assert sum(w.logprob for w in fixed.words) == pytest.approx(
        sum(w.tokens_logprob for w in fixed.words) + r.after[-1] - first, abs=TOL * len(ids)
    )
    # Offsets that split a token (a token with two characters or more that are not spaces).
    at, token = 0, None
    for t in plain.tokens:
        if len(t.token.strip()) >= 2 and "\ufffd" not in t.token:
            token = t
            break
        at += len(t.token)
    assert token is not None
    lead = len(token.token) - len(token.token.lstrip())
    split = (at + lead, at + lead + 1)
    with pytest.raises(ValueError, match=r"prompts\[0\]: words\[0\]\[0\] .* splits the token"):
        vllm_loglik.prompt_loglikelihood(llm, [PLAIN_TEXT], words=[[split]])
    with pytest.raises(ValueError, match=r"words\[0\]\[1\] is \[0, 3\]: it starts before the end"):
        vllm_loglik.prompt_loglikelihood(llm, [PLAIN_TEXT], words=[[(0, 3), (0, 3)]])


def test_words_on_the_server(family):
    client = family.server.client()
    # The prompt, full and compact: the offline API's numbers (checked against transformers).
    [offline] = vllm_loglik.prompt_loglikelihood(family.llm, [WORDS_TEXT], words=True)
    for content in (True, False):
        r = client.completions.create(
            model="tiny", prompt=WORDS_TEXT, max_tokens=0,
            extra_body={"loglikelihood": {"words": True, "content": content}},
        )  # fmt: skip
        [entry] = _entries(r)
        check_words(entry.words, offline.words)
        assert entry.words_left_out == 0 and (entry.content is None) != content
    # Continuations with their own offsets each, as plain sums; and a rolling document.
    conts = [" Paris is nice", " 42 apples"]
    r = client.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=0,
        extra_body={"loglikelihood": {"continuations": conts, "words": [[[1, 6]], [[1, 3], [4, 10]]],
                                      "word_probability": "tokens"}},
    )  # fmt: skip
    got = _entries(r)
    offline = vllm_loglik.loglikelihood(
        family.llm, [("The capital of France is", c) for c in conts],
        words=[[(1, 6)], [(1, 3), (4, 10)]], word_probability="tokens",
    )  # fmt: skip
    for entry, score in zip(got, offline, strict=True):
        check_words(entry.words, score.words)
    assert [w.text for w in got[1].words] == ["42", "apples"]
    r = client.completions.create(model="tiny", prompt=ROLLING, max_tokens=0, extra_body={
        "loglikelihood": {"scope": "rolling", "words": True, "content": False}})  # fmt: skip
    [score] = vllm_loglik.loglikelihood_rolling(family.llm, [ROLLING], words=True)
    check_words(_entries(r)[0].words, score.words)
    # Chat: candidates, and the last message.
    r = client.chat.completions.create(
        model="tiny", messages=CHAT[:1], max_tokens=0,
        extra_body={"loglikelihood": {"continuations": CANDIDATES, "words": True}},
    )  # fmt: skip
    [offline] = vllm_loglik.chat_loglikelihood(family.llm, [CHAT[:1]], candidates=[CANDIDATES], words=True)
    for entry, score in zip(_entries(r), offline, strict=True):
        check_words(entry.words, score.words)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=0, extra_body={
        "loglikelihood": {"scope": "last_message", "words": True}})  # fmt: skip
    [score] = vllm_loglik.chat_loglikelihood(family.llm, [CHAT], words=True)
    check_words(_entries(r)[0].words, score.words)
    # Bad words: a 400 that names the field, and the server goes on.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for words, param, message in [
        ([[0, 3], [2, 5]], "loglikelihood.words[1]", "starts before the end"),
        ([[0, 300]], "loglikelihood.words[0]", "the text has"),
        ([[[0, 3]]], "loglikelihood.words", "one per continuation"),
        ([[3, 1]], "loglikelihood.words[0]", "need 0 <= start < end"),
        ("yes", "body.loglikelihood", "loglikelihood.words must be true, a list of"),
    ]:
        bad = httpx.post(family.server.url + "/v1/completions", headers=headers, json={
            "model": "tiny", "prompt": "Q:", "max_tokens": 0,
            "loglikelihood": {"continuations": [" Paris is", " Rome"], "words": words}})  # fmt: skip
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert error["param"] == param and message in error["message"], error
    bad = httpx.post(family.server.url + "/v1/completions", headers=headers, json={
        "model": "tiny", "prompt": "Q:", "max_tokens": 0,
        "loglikelihood": {"words": True, "word_probability": "sum"}})  # fmt: skip
    assert bad.status_code == 400 and "word_probability" in bad.json()["error"]["message"]
    assert family.server.alive()

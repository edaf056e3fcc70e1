"""Word scores: the layout of words on tokens (no engine), and a peer, minicons, run itself.

The numbers against a transformers reference, on every tokenizer family and every mode, offline
and on the server, are in tests/test_tokenizers.py (`test_words_*`), with that module's engines.
"""

from __future__ import annotations

import math

import pytest

import vllm_loglik
from vllm_loglik.tokenization import Tokenization
from vllm_loglik.words import (
    WordLayout,
    WordsError,
    boundary_ids,
    check_offsets,
    layout,
    log1mexp,
    text_words,
    word_scores,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def tokens(ref):
    return Tokenization(ref.tokenizer)


def test_text_words_are_runs_of_non_whitespace():
    text = '  "Why?" she\u3000asked.\t42\n🙂 東京の空  '
    assert [text[s:e] for s, e in text_words(text)] == text.split()
    assert text_words("") == [] and text_words(" \n\t") == []


def test_offsets_are_checked_with_the_field_named():
    assert check_offsets([[0, 3], [4, 6]]) == [(0, 3), (4, 6)]
    for value, field, message in [
        ([[0, 3], [2, 5]], "loglikelihood.words[1]", "starts before the end"),
        ([[3, 3]], "loglikelihood.words[0]", "need 0 <= start < end"),
        ([[0, True]], "loglikelihood.words[0]", "pair of character offsets"),
        ([[0, 1, 2]], "loglikelihood.words[0]", "pair of character offsets"),
    ]:
        with pytest.raises(WordsError, match=message) as e:
            check_offsets(value)
        assert e.value.field == field
    with pytest.raises(ValueError, match="non-empty list"):
        check_offsets([])


def test_boundary_set_is_whitespace_first_and_special(tokens):
    ids = boundary_ids(tokens)
    assert tokens.tokenizer.eos_token_id in ids and tokens.tokenizer.bos_token_id in ids
    space = tokens.encode_plain(" the")[0]
    word = tokens.encode_plain("the")[0]
    assert space in ids and word not in ids
    # A piece that starts with a UTF-8 continuation byte (0x85, 0xA0: parts of other
    # characters) does not start with whitespace, though chr(0x85) is Python whitespace.
    for i in range(tokens.vocab_size):
        if tokens.piece_bytes(i)[:1] in (b"\x85", b"\xa0"):
            assert i not in ids


def test_layout_merges_words_that_share_a_token_and_checks_user_words(tokens):
    text = "Hello world"
    ids = tokens.encode_plain(text)
    trims = [False] * len(ids)
    placed = layout(tokens, text, ids, trims, True, True)
    assert [w.text for w in placed.words] == ["Hello", "world"]
    assert placed.words[0].first == 0 and placed.words[-1].last == len(ids) - 1
    # A user's word inside a token: refused, with the token named.
    first = tokens.token(ids[0])[0]
    if len(first) >= 2:
        with pytest.raises(WordsError, match="splits the token") as e:
            layout(tokens, text, ids, trims, [(0, 1)], True)
        assert e.value.field == "loglikelihood.words[0]"
    with pytest.raises(WordsError, match="the text has 11 characters"):
        layout(tokens, text, ids, trims, [(0, 12)], True)


def test_layout_of_token_ids_that_split_a_character(tokens):
    """Token ids whose last token holds only part of a character (a text that shows U+FFFD):
    the words are laid on characters, and every token belongs to one."""
    ids = tokens.encode_plain("an 𝔘𝔫 b")
    for k in range(1, len(ids)):
        text = tokens.text_of(ids[:k])
        if "\ufffd" in text:
            break
    else:
        pytest.skip("no token boundary inside a character")
    placed = layout(tokens, text, ids[:k], [False] * k, True, True)
    assert [w.text for w in placed.words] == text.split()
    assert placed.words[-1].last == k - 1


def test_word_scores_arithmetic():
    from vllm_loglik.words import Word

    words = WordLayout((Word("a", 0, 0, 1, True, False), Word("b", 2, 2, 2, False, True)), True)
    lps, starts, ends = [-1.0, -2.0, -3.0], [-0.5, -0.1, -0.7], [-0.2, -0.3, -0.4]
    a, b = word_scores(words, lps, starts, ends)
    assert a.tokens_logprob == -3.0 and a.logprob == pytest.approx(-3.0 + -0.3 - -0.5)
    assert b.logprob == pytest.approx(-3.0 - log1mexp(-0.7)) and b.num_tokens == 1
    plain = word_scores(WordLayout(words.words, False), lps, None, None)
    assert [w.logprob for w in plain] == [-3.0, -3.0]
    assert log1mexp(-1e-9) == pytest.approx(math.log(1e-9), rel=1e-6)
    assert log1mexp(-50.0) == pytest.approx(-math.exp(-50.0), rel=1e-6)


MINICONS_TEXTS = [
    "The quick brown fox jumps over the lazy dog, said Ωμέγα.",
    "Tulips grew in the old garden behind the mill, and nobody knew why.",
]


def test_minicons_word_scores_equal_ours_as_plain_sums(llm, model_path):
    """minicons' `word_score_tokenized` (uncorrected: the plain sum of each word's tokens) on
    the demo model, against `word_probability: "tokens"`, on the words where its alignment (it
    tokenizes each word alone) gives the same tokens as the text in context."""
    from minicons import scorer

    lm = scorer.IncrementalLMScorer(model_path, device="cpu")
    theirs = lm.word_score_tokenized(MINICONS_TEXTS, tokenize_function=str.split)
    spans, _ = lm.word_spans_tokenized(MINICONS_TEXTS, str.split)
    ours = vllm_loglik.prompt_loglikelihood(llm, MINICONS_TEXTS, words=True, word_probability="tokens")
    compared = 0
    for text, their_words, their_spans, score in zip(MINICONS_TEXTS, theirs, spans, ours, strict=True):
        assert [w for w, _ in their_words] == [w.text for w in score.words] == text.split()
        at = 0
        for (word, value), (s, e), w in zip(their_words, their_spans, score.words, strict=True):
            if (s, e) == (at, at + w.num_tokens):  # the same tokens
                assert w.tokens_logprob == pytest.approx(value, abs=TOL), word
                assert w.logprob == w.tokens_logprob
                compared += 1
            at += w.num_tokens
    assert compared >= 15  # of 23 words


def test_words_across_prefill_chunks_equal_the_reference(llm, ref):
    """40 prompts of 127 tokens in one call: the engine's step (4,096 tokens) splits one of
    them between two chunks, so its P_B after the first chunk's last row comes from the next
    chunk. Every word of every prompt against transformers."""
    from types import SimpleNamespace

    from vllm_loglik.testing import default_corpus

    from . import words_reference as wr

    family = SimpleNamespace(ref=ref, hf=ref.tokenizer, mistral=None)
    boundary = wr.boundary_ids(family, ref.model.config.vocab_size)
    corpus = [w for w in default_corpus().split() if w.isascii()]
    prompts = []
    for i in range(40):
        ids = ref.tokenizer.encode(" ".join(corpus[i * 7 :]))[:127]
        prompts.append(ids)
    scores = vllm_loglik.prompt_loglikelihood(llm, prompts, words=True)
    assert sum(len(p) for p in prompts) > 4096
    for ids, score in zip(prompts, scores, strict=True):
        r = wr.rows(family, ids, 1, boundary)
        expected = wr.words(score.text, score.token_ids, [bytes(t.bytes) for t in score.tokens],
                            r, boundary, wr.piece_reader(family))  # fmt: skip
        assert [w.text for w in score.words] == [w.text for w in expected]
        assert [w.logprob for w in score.words] == pytest.approx([w.logprob for w in expected], abs=TOL)
        assert all(math.isfinite(w.logprob) for w in score.words)


def test_corrected_words_with_alternatives_up_to_the_engines_cap(llm, server):
    """Corrected words take two prompt-logprob columns beyond the alternatives on V1 (its
    patch's), none on V2 (token-id scores). With the engine's `max_logprobs` (vLLM's default,
    20) less one alternatives, V1 refuses by the field's name offline (ValueError), on the
    server (400) and in the batch CLI (an error record), and scores with two less; V2 scores
    with 20. The words are those scored with one alternative."""
    import json

    import httpx

    from vllm_loglik import batch

    from .conftest import API_KEY, HAS_V1

    auth = {"Authorization": f"Bearer {API_KEY}"}
    text = "The capital of France is Paris"
    [base] = vllm_loglik.prompt_loglikelihood(llm, [text], words=True, top_logprobs=1)
    expected = [(w.text, w.logprob) for w in base.words]

    def attempt(top: int):
        try:
            [offline] = vllm_loglik.prompt_loglikelihood(llm, [text], words=True, top_logprobs=top)
        except ValueError as e:
            offline = e
        options = {"words": True, "top_logprobs": top}
        r = httpx.post(server.url + "/v1/completions", timeout=60, headers=auth, json={
            "model": "tiny", "prompt": text, "max_tokens": 0, "loglikelihood": options})  # fmt: skip
        records: list[dict] = []
        line = json.dumps({"prompt": text, "loglikelihood": options})
        # With --details (the batch format lists alternatives only then).
        batch.run_engine(llm, iter([(1, line)]), records.append, details=True)
        return offline, r, records[0]

    if HAS_V1:
        offline, r, record = attempt(19)
        assert isinstance(offline, ValueError) and "top_logprobs is 19" in str(offline)
        assert r.status_code == 400, r.text
        for error in (r.json()["error"], record["error"]):
            assert error["param"] == "loglikelihood.top_logprobs", error
        for message in (str(offline), r.json()["error"]["message"], record["error"]["message"]):
            assert "at most 18" in message and "max_logprobs" in message, message
    top = 18 if HAS_V1 else 20
    offline, r, record = attempt(top)
    assert r.status_code == 200, r.text
    assert len(offline.tokens[-1].top_logprobs) == top
    got = [
        [(w.text, w.logprob) for w in offline.words],
        [(w["text"], w["logprob"]) for w in r.json()["choices"][0]["loglikelihood"][0]["words"]],
        [(w["text"], w["logprob"]) for w in record["loglikelihood"][0]["words"]],
    ]
    for words in got:
        assert [t for t, _ in words] == [t for t, _ in expected]
        assert [lp for _, lp in words] == pytest.approx([lp for _, lp in expected], abs=TOL)


#: Japanese, then Chinese: on the demo's byte-level BPE tokenizer (trained on English text),
#: their characters are split into one- and two-byte tokens, some across two characters.
CJK = "日本語の文章です 中文句子测试一下吧 done 🙂x"


def _overlapping(pieces: list[bytes], lo: int, hi: int) -> list[int]:
    """The indexes of the pieces whose bytes overlap `[lo, hi)` of their concatenation."""
    out, at = [], 0
    for i, p in enumerate(pieces):
        if at < hi and at + len(p) > lo and p:
            out.append(i)
        at += len(p)
    return out


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_every_token_of_a_word_counts_whatever_the_first_token_splits(llm, ref, tokens, bos):
    """A prompt whose first token (unscored without BOS) holds the first bytes of a character:
    the entry's text starts with that whole character, never U+FFFD, and every word's tokens
    are all the tokens that hold one of its bytes (a 22-token Chinese word keeps all 22), with
    their logprobs summed as transformers computes them."""
    ids = tokens.encode_plain(CJK)
    first_bytes = tokens.text_bytes(ids[0])
    assert not CJK.startswith(first_bytes.decode(errors="replace"))  # it splits a character
    if bos:
        ids = [ref.tokenizer.bos_token_id, *ids]
    (score,) = vllm_loglik.prompt_loglikelihood(
        llm, [ids], words=True, word_probability="tokens", top_logprobs=0
    )
    assert "\ufffd" not in score.text and CJK.endswith(score.text)
    pieces = [bytes(t.bytes) for t in score.tokens]
    data = score.text.encode()
    head = len(data) - len(b"".join(pieces))  # the bytes of the split character before them
    assert data.endswith(b"".join(pieces)) and (head == 0 if bos else 0 < head < 4)
    want, _ = ref.token_logprobs(ids)
    first = 1
    for word in score.words:
        lo = len(score.text[: word.offset].encode()) - head
        hi = lo + len(word.text.encode())
        held = _overlapping(pieces, lo, hi)
        assert word.num_tokens == len(held), word
        assert word.tokens_logprob == pytest.approx(
            math.fsum(want[first - 1 + i] for i in held), abs=TOL * len(held)
        )
        assert word.logprob == word.tokens_logprob
    chinese = next(w for w in score.words if w.text.startswith("中"))
    assert chinese.num_tokens >= 20
    (corrected,) = vllm_loglik.prompt_loglikelihood(llm, [ids], words=True)
    assert [w.tokens_logprob for w in corrected.words] == pytest.approx(
        [w.tokens_logprob for w in score.words], abs=TOL
    )
    assert [w.num_tokens for w in corrected.words] == [w.num_tokens for w in score.words]
    assert all(math.isfinite(w.logprob) for w in corrected.words)
    if bos:
        assert score.text == CJK and score.words[0].text == "日本語の文章です"
    else:
        assert score.words[0].text == "中文句子测试一下吧"  # the first word has no first logprob


def test_user_words_of_a_text_that_starts_inside_a_character(ref):
    """User offsets from the text's first character (whose first bytes are in the unscored
    first token) are laid on the scored tokens, not refused as splitting one."""
    from vllm_loglik.jobs import Scorer

    scorer = Scorer(ref.tokenizer, 512)
    job = scorer.prompt(Tokenization(ref.tokenizer).encode_plain(CJK))
    text = job.text
    assert not CJK.startswith(text) and CJK.endswith(text)  # from the split character on
    first, chinese = (0, text.index(" ")), (text.index("中"), text.index("吧") + 1)
    placed = scorer.with_words(job, [first, chinese], False).words
    assert [w.text for w in placed.words] == [text[slice(*first)], text[slice(*chinese)]]
    assert placed.words[0].first == 0 and placed.words[1].last - placed.words[1].first + 1 >= 20

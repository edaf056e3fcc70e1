"""Property tests, one per tokenizer family, with no engine: for random Unicode text, the
`bytes` of the scored tokens join to the UTF-8 of exactly the scored text, for whole prompts and
for continuations (lm-eval's split, and the fallback where BPE merges across the boundary)."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from vllm_loglik.jobs import Scorer
from vllm_loglik.testing import (
    build_sentencepiece_tokenizer,
    build_tokenizer,
    mistral_common_data,
)

FAMILIES = ("bpe", "sentencepiece", "tekken", "mistral-sentencepiece")

# Any character but lone surrogates (no UTF-8) and U+2581, which SentencePiece reads as its word
# marker, a space: the text's own bytes for it cannot be told from the tokens (docs/scoring.md).
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="▁"), max_size=40)


@pytest.fixture(scope="module", params=FAMILIES)
def scorer(request, tmp_path_factory) -> Scorer:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "bpe":
        return Scorer(build_tokenizer(1024), 10_000)
    if request.param == "sentencepiece":
        return Scorer(build_sentencepiece_tokenizer(root), 10_000)
    from vllm.tokenizers import get_tokenizer

    name = "tekken_240718.json" if request.param == "tekken" else "mistral_instruct_tokenizer_240323.model.v3"
    target = "tekken.json" if request.param == "tekken" else "tokenizer.model.v3"
    shutil.copy(mistral_common_data() / name, root / target)
    return Scorer(get_tokenizer(str(root), tokenizer_mode="mistral"), 10_000)


def _joined(scorer: Scorer, job) -> bytes:
    out = b""
    for span in job.spans:
        for i, token_id in enumerate(span.scored_token_ids):
            out += bytes(scorer.tokens.token(token_id, span.start + i in span.trim)[1])
    return out


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(text=TEXT)
@example(text="<s>")  # a special token's text after the BOS the encoder adds (found by CI)
@example(text="a</s> <s>")
def test_prompt_bytes_join_to_the_text(scorer, text):
    assume(text)
    job = scorer.prompt(text)
    assert _joined(scorer, job) == text.encode("utf-8")
    assert job.text == text


@SETTINGS
@given(context=TEXT, continuation=TEXT)
def test_continuation_bytes_join_to_the_continuation(scorer, context, continuation):
    assume(continuation)
    stripped = context.rstrip()
    moved = context[len(stripped) :] + continuation
    try:
        job = scorer.pair(context, continuation)
    except ValueError as e:  # whitespace a tokenizer drops: no token left to score
        assume("encodes to no tokens" not in str(e))
        raise
    assert _joined(scorer, job) == moved.encode("utf-8")


@SETTINGS
@given(text=TEXT)
def test_rolling_and_continuation_alone(scorer, text):
    assume(text)
    assert _joined(scorer, scorer.rolling(text)) == text.encode("utf-8")
    job = scorer.pair_ids([scorer.tokens.prefix_token_id], text)
    assert _joined(scorer, job) == text.encode("utf-8")

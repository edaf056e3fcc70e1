"""The arithmetic of a score: sum the logprobs of a span, decide greedy, build per-token entries.

Input is what vLLM's prompt-logprobs path returns for the scored positions of a span, read from
the engine's output by `vllm_loglik.engine_output` into `ScoredRows`: per position, the logprob
and rank of the prompt's token and the top k alternatives. Nothing here needs an engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from .engine_output import EngineOutputError, ScoredRows, require_span_logprobs
from .spans import Span
from .tokenization import Tokenization
from .words import WordScore


class TopLogprob(msgspec.Struct, frozen=True):
    """One alternative at a scored position.

    `TopLogprob` and `TokenScore` are msgspec structs, whose fields are in the order of the
    server's JSON: a response holds one per scored token, and the server encodes them as they
    are, with no dict built per token.
    """

    token: str
    token_id: int
    logprob: float
    bytes: list[int]


class TokenScore(msgspec.Struct, frozen=True):
    """One scored token: its logprob given everything before it, and its rank (1 = argmax)."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int]
    rank: int
    top_logprobs: list[TopLogprob] = []


@dataclass(frozen=True)
class TokenArrays:
    """The scored tokens of a text as numpy arrays: the compact array form (`content: "arrays"`),
    for many long texts (a reference model's logprobs of a dataset's completions, a teacher's
    top k) where an object per token would cost more than the scoring. Row i is the text's i-th
    scored token; `top_*` hold the k best alternatives, best first (`-inf` and 0 past what the
    engine returned)."""

    token_ids: Any  # [n] int32
    logprobs: Any  # [n] float32
    ranks: Any  # [n] int32
    top_token_ids: Any  # [n, k] int32
    top_logprobs: Any  # [n, k] float32

    @classmethod
    def of(cls, spans: Sequence[Span], rows: Sequence[ScoredRows], k: int) -> TokenArrays:
        import numpy as np

        ids = [t for span in spans for t in span.scored_token_ids]
        n = len(ids)
        top_ids = np.zeros((n, k), dtype=np.int32)
        top_lps = np.full((n, k), -np.inf, dtype=np.float32)
        at = 0
        for part in rows:
            if k and part.top is not None:
                if {len(r) for r in part.top} == {k}:
                    pairs = np.asarray(part.top, dtype=np.float64).reshape(len(part), k, 2)
                    top_ids[at : at + len(part)] = pairs[:, :, 0]
                    top_lps[at : at + len(part)] = pairs[:, :, 1]
                else:
                    for j, r in enumerate(part.top):
                        top_ids[at + j, : len(r[:k])] = [a for a, _ in r[:k]]
                        top_lps[at + j, : len(r[:k])] = [lp for _, lp in r[:k]]
            at += len(part)
        return cls(
            np.asarray(ids, dtype=np.int32),
            np.asarray([lp for part in rows for lp in part.logprobs], dtype=np.float32),
            np.asarray([r for part in rows for r in part.ranks], dtype=np.int32),
            top_ids,
            top_lps,
        )


@dataclass(frozen=True)
class Score:
    """The loglikelihood of one scored text.

    `logprob` is the sum over `tokens` of log P(token | all tokens before it); `is_greedy`
    is true when every token is the model's argmax (rank 1). A `Score` unpacks as
    lm-evaluation-harness's `(logprob, is_greedy)` pair: `ll, greedy = score`.
    """

    text: str
    logprob: float
    is_greedy: bool
    num_tokens: int
    tokens: list[TokenScore]
    #: With words asked for: each word of `text`, in order (`vllm_loglik.words`), and how many
    #: were left out (the prompt's first word, whose first token has no logprob).
    words: list[WordScore] | None = None
    words_left_out: int = 0
    #: With `content="arrays"`: the scored tokens as arrays (`tokens` is then empty).
    arrays: TokenArrays | None = None

    def __iter__(self):
        yield self.logprob
        yield self.is_greedy

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def perplexity(self) -> float:
        """exp(-mean logprob per token)."""
        return math.exp(-self.logprob / self.num_tokens)


def _check(span: Span, rows: ScoredRows) -> None:
    if len(rows) != len(span.prompt_token_ids) - span.start:
        raise EngineOutputError(
            f"got {len(rows)} scored entries for {len(span.prompt_token_ids) - span.start} "
            "scored tokens"
        )


def score_tokens(
    span: Span, rows: ScoredRows, tokens: Tokenization, top_logprobs: int = 0
) -> list[TokenScore]:
    """The scored tokens of `span`, from the `ScoredRows` of its scored positions, as
    `vllm_loglik.engine_output.span_logprobs` reads them from the engine's output (in either
    model runner's layout). `top_logprobs` alternatives are kept per token, best first (the
    rows must hold at least that many).

    A token's `bytes` are those it stands for in the text (`Tokenization.token`): at a position
    where the tokenizer put its dummy prefix (`span.trim`), the leading space is dropped, from
    the alternatives too, since they would stand there in its place."""
    _check(span, rows)
    out = []
    top = rows.top if top_logprobs else None
    for i, token_id in enumerate(span.scored_token_ids):
        trim = span.start + i in span.trim
        alternatives = []
        if top is not None:
            for alt_id, alt_logprob in top[i][:top_logprobs]:
                alt_text, alt_bytes = tokens.token(alt_id, trim)
                alternatives.append(TopLogprob(alt_text, alt_id, alt_logprob, alt_bytes))
        text, token_bytes = tokens.token(token_id, trim)
        out.append(
            TokenScore(text, token_id, rows.logprobs[i], token_bytes, rows.ranks[i], alternatives)
        )
    return out


def score_span(
    span: Span,
    prompt_logprobs: Sequence[Mapping[int, Any] | None],
    tokens: Tokenization,
    top_logprobs: int = 0,
    text: str | None = None,
) -> Score:
    """The `Score` of one span from the prompt logprobs of a request computed without the cache
    (an entry per prompt position); `text` labels it (by default, what the scored tokens stand
    for)."""
    if text is None:
        text = scored_text(tokens, span)
    rows = require_span_logprobs(prompt_logprobs, 0, span, "score_span", top_logprobs)
    return combine(text, [score_tokens(span, rows, tokens, top_logprobs)])


def scored_text(tokens: Tokenization, span: Span) -> str:
    """What the scored tokens of `span` stand for in the text: their `bytes`, joined, from the
    first character they touch. Where the first scored token starts inside a character (a
    byte-level tokenizer whose unscored first token holds the first bytes of a CJK character
    or an emoji), the text starts with that whole character, its first bytes taken from the
    tokens before the span, never with replacement characters for them."""
    data = b"".join(
        tokens.text_bytes(t, p in span.trim)
        for p, t in enumerate(span.prompt_token_ids[span.start :], span.start)
    )
    head = _split_head(tokens, span, data)
    return (head + data).decode("utf-8", errors="replace")


def _split_head(tokens: Tokenization, span: Span, data: bytes) -> bytes:
    """The first bytes of the character that `data` (the scored bytes) starts inside, from the
    tokens before the span; empty where `data` starts a character."""
    tail = len(data) - len(data.lstrip(bytes(range(0x80, 0xC0))))
    if not tail or tail > 3:
        return b""
    before = b""
    for p in range(span.start - 1, -1, -1):  # the few bytes before the span, token by token
        before = tokens.text_bytes(span.prompt_token_ids[p], p in span.trim) + before
        if len(before) >= 4:
            break
    for lead in range(1, 4):
        head = before[-lead:]
        first = head[:1]
        if len(head) == lead and first and first[0] >= 0xC0:
            size = 2 if first[0] < 0xE0 else 3 if first[0] < 0xF0 else 4
            if size == lead + tail and all(0x80 <= b < 0xC0 for b in head[1:]):
                return head
    return b""


def score_totals(span: Span, rows: ScoredRows) -> tuple[float, bool]:
    """The sum of the scored tokens' logprobs and whether each is the argmax (rank 1), with no
    per-token objects: what the compact response needs."""
    _check(span, rows)
    return sum(rows.logprobs), all(rank == 1 for rank in rows.ranks)


def combine(text: str, parts: Sequence[Sequence[TokenScore]]) -> Score:
    """One `Score` over the tokens of several spans, in order (the rolling windows of a text)."""
    tokens = [t for part in parts for t in part]
    return Score(
        text=text,
        logprob=sum(t.logprob for t in tokens),
        is_greedy=all(t.rank == 1 for t in tokens),
        num_tokens=len(tokens),
        tokens=tokens,
    )

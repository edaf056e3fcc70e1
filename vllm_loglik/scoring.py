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


def _byte_decoder() -> dict[str, int]:
    # The inverse of GPT-2's bytes_to_unicode table, which byte-level BPE vocabularies use.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenDecoder:
    """Token text and exact bytes for token ids, cached per id.

    `text` is the token decoded on its own (a partial UTF-8 character shows as U+FFFD, as in
    vLLM's own logprobs); `bytes` are the token's exact bytes where the vocabulary says them
    (byte-level BPE pieces, `<0xNN>` byte-fallback pieces), else the UTF-8 of `text`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._bytes = _byte_decoder() if _is_byte_level(tokenizer) else None
        self._special = set(getattr(tokenizer, "all_special_tokens", []))

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._decode(token_id)
        return hit

    def _decode(self, token_id: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token_id])
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if piece in self._special:
                return text, list(text.encode("utf-8"))
            if self._bytes is not None and all(c in self._bytes for c in piece):
                return text, [self._bytes[c] for c in piece]
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return text, [int(piece[3:5], 16)]
        return text, list(text.encode("utf-8"))


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def _check(span: Span, rows: ScoredRows) -> None:
    if len(rows) != len(span.prompt_token_ids) - span.start:
        raise EngineOutputError(
            f"got {len(rows)} scored entries for {len(span.prompt_token_ids) - span.start} "
            "scored tokens"
        )


def score_tokens(
    span: Span, rows: ScoredRows, decode: TokenDecoder, top_logprobs: int = 0
) -> list[TokenScore]:
    """The scored tokens of `span`, from the `ScoredRows` of its scored positions, as
    `vllm_loglik.engine_output.span_logprobs` reads them from the engine's output (in either
    model runner's layout). `top_logprobs` alternatives are kept per token, best first (the
    rows must hold at least that many)."""
    _check(span, rows)
    tokens = []
    top = rows.top if top_logprobs else None
    for i, token_id in enumerate(span.scored_token_ids):
        alternatives = []
        if top is not None:
            for alt_id, alt_logprob in top[i][:top_logprobs]:
                alt_text, alt_bytes = decode(alt_id)
                alternatives.append(TopLogprob(alt_text, alt_id, alt_logprob, alt_bytes))
        text, token_bytes = decode(token_id)
        tokens.append(
            TokenScore(text, token_id, rows.logprobs[i], token_bytes, rows.ranks[i], alternatives)
        )
    return tokens


def score_span(
    span: Span,
    prompt_logprobs: Sequence[Mapping[int, Any] | None],
    decode: TokenDecoder,
    top_logprobs: int = 0,
    text: str | None = None,
) -> Score:
    """The `Score` of one span from the prompt logprobs of a request computed without the cache
    (an entry per prompt position); `text` labels it (by default, the scored tokens decoded)."""
    if text is None:
        text = decode.tokenizer.decode(span.scored_token_ids)
    rows = require_span_logprobs(prompt_logprobs, 0, span, "score_span", top_logprobs)
    return combine(text, [score_tokens(span, rows, decode, top_logprobs)])


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

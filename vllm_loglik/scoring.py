"""The arithmetic of a score: sum the logprobs of a span, decide greedy, build per-token entries.

Input is what vLLM's prompt-logprobs path returns for the scored positions of a span, read from
the engine's output by `vllm_loglik.engine_output`: per position a mapping `{token_id: obj}`
where `obj` has `.logprob` and `.rank` (vLLM's `Logprob`), holding the actual token and the top
k alternatives. Nothing here needs an engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .engine_output import EngineOutputError, require_span_logprobs
from .spans import Span


class LogprobLike(Protocol):
    logprob: float
    rank: int | None


PositionLogprobs = Mapping[int, LogprobLike] | None


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a scored position."""

    token_id: int
    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class TokenScore:
    """One scored token: its logprob given everything before it, and its rank (1 = argmax)."""

    token_id: int
    token: str
    bytes: list[int]
    logprob: float
    rank: int
    top_logprobs: list[TopLogprob] = field(default_factory=list)


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


def _actual_tokens(
    span: Span, scored_logprobs: Sequence[Mapping[int, LogprobLike]]
) -> Iterator[tuple[int, Mapping[int, LogprobLike], LogprobLike]]:
    """(token id, entry, the token's own logprob) per scored position; an entry that does not
    fit the span is an `EngineOutputError`."""
    ids = span.prompt_token_ids
    if len(scored_logprobs) != len(ids) - span.start:
        raise EngineOutputError(
            f"got {len(scored_logprobs)} scored entries for {len(ids) - span.start} scored tokens"
        )
    for pos, entry in zip(range(span.start, len(ids)), scored_logprobs):
        actual = entry.get(ids[pos]) if entry else None
        if actual is None:
            raise EngineOutputError(f"the engine returned no logprob for prompt position {pos}")
        yield ids[pos], entry, actual


def score_tokens(
    span: Span,
    scored_logprobs: Sequence[Mapping[int, LogprobLike]],
    decode: TokenDecoder,
    top_logprobs: int = 0,
) -> list[TokenScore]:
    """The scored tokens of `span`, from the engine's entries for its scored positions.

    `scored_logprobs[i]` is the entry of prompt position `span.start + i`, as
    `vllm_loglik.engine_output.span_logprobs` reads it from the engine's output (in either model
    runner's layout). `top_logprobs` alternatives are kept per token, best first (the engine
    must have been asked for at least that many).
    """
    tokens = []
    for token_id, entry, actual in _actual_tokens(span, scored_logprobs):
        alternatives = []
        if top_logprobs:
            ranked = sorted(entry.items(), key=lambda kv: kv[1].logprob, reverse=True)
            for alt_id, alt in ranked[:top_logprobs]:
                alt_text, alt_bytes = decode(alt_id)
                alternatives.append(TopLogprob(alt_id, alt_text, alt_bytes, alt.logprob))
        token_text, token_bytes = decode(token_id)
        tokens.append(
            TokenScore(
                token_id=token_id,
                token=token_text,
                bytes=token_bytes,
                logprob=actual.logprob,
                rank=actual.rank if actual.rank is not None else 0,
                top_logprobs=alternatives,
            )
        )
    return tokens


def score_span(
    span: Span,
    prompt_logprobs: Sequence[PositionLogprobs],
    decode: TokenDecoder,
    top_logprobs: int = 0,
    text: str | None = None,
) -> Score:
    """The `Score` of one span from the prompt logprobs of a request computed without the cache
    (an entry per prompt position); `text` labels it (by default, the scored tokens decoded)."""
    if text is None:
        text = decode.tokenizer.decode(span.scored_token_ids)
    scored = require_span_logprobs(prompt_logprobs, 0, span, "score_span")
    return combine(text, [score_tokens(span, scored, decode, top_logprobs)])


def score_totals(
    span: Span, scored_logprobs: Sequence[Mapping[int, LogprobLike]]
) -> tuple[float, bool]:
    """The sum of the scored tokens' logprobs and whether each is the argmax (rank 1), with no
    per-token objects: what the compact response needs. Checked as `score_tokens` checks."""
    total, greedy = 0.0, True
    for _, _, actual in _actual_tokens(span, scored_logprobs):
        total += actual.logprob
        greedy = greedy and actual.rank == 1
    return total, greedy


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

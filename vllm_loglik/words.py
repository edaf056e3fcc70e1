"""Word-level loglikelihood: which scored tokens make up each word, and each word's probability.

A word is scored from the tokens that spell it. With tokens that carry a word's leading space
(byte-level BPE's `Ġ`, SentencePiece's `▁`, Tekken's space-leading tokens), the plain sum of a
word's token logprobs is the probability of "these characters, possibly followed by more
letters": it never asks whether the word ended there, and it charges the word for the space in
front of it. The correction (Pimentel and Meister, "How to Compute the Probability of a Word",
EMNLP 2024; Oh and Schuler, EMNLP 2024)::

    log p(w | c) = sum of log p(t | ...) over w's tokens + log P_B(after w) - log P_before(w)

* B, the tokens that begin a new word (`boundary_ids`): the vocabulary's tokens whose text
  starts with whitespace, the end-of-sequence token and the other special (control) tokens: the
  text may end after the word, or a chat turn.
* P_B(after w): the total probability of B right after w's last token (the word ended there);
  no such term when that token itself ends with whitespace (Llama-3's `.\\n`: it ends the word).
* P_before(w): the total probability, right before w's first token, of the class that token is
  in: P_B when it is in B (the usual case), else 1 - P_B (the first word of a text without a
  space, a word right after a newline token).

Each P_B is a logsumexp over B at one position, which the engine computes on the target-only
path (`vllm_loglik.target_logprobs`) for the requests that ask for it: each scored row then
carries log P_B of its own distribution (`ScoredRows.starts`) and of the next one
(`ScoredRows.ends`, which for the last prompt token is the distribution after it, where the
engine samples).

`layout` lays a job's words on its scored tokens before anything reaches the engine (bad word
offsets are the request's error); `word_scores` computes each word's numbers from the rows.
Nothing here needs an engine.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .tokenization import Tokenization

#: `loglikelihood.word_probability`: the correction above, or the plain sum of the tokens.
WordProbability = Literal["corrected", "tokens"]
WORD_PROBABILITIES = ("corrected", "tokens")


class WordScore(msgspec.Struct, frozen=True):
    """One word of a scored text, in the server's JSON order."""

    text: str
    offset: int  # characters into the entry's text
    num_tokens: int
    logprob: float  # as `word_probability` asks
    tokens_logprob: float  # the plain sum of its tokens' logprobs


@dataclass(frozen=True)
class Word:
    """A word laid on a job's scored tokens: `first..last` index them (over all spans)."""

    text: str
    offset: int
    first: int
    last: int
    #: Its first token is in B (P_before is P_B), else 1 - P_B.
    starts_in_b: bool
    #: Its last token ends with whitespace: it ends the word itself (no P_B(after) term).
    ends_itself: bool


@dataclass(frozen=True)
class WordLayout:
    """The words of one job, how to compute them, and how many were left out (the prompt's
    first word, whose first token has no logprob)."""

    words: tuple[Word, ...]
    corrected: bool
    left_out: int = 0


def _edge_is_space(data: bytes, at_end: bool) -> bool:
    """Whether the first (or last) whole character of `data`, a token's bytes, is whitespace:
    a lone UTF-8 lead or continuation byte is part of another character, never whitespace."""
    if not data:
        return False
    byte = data[-1] if at_end else data[0]
    if byte < 0x80:
        return chr(byte).isspace()
    for n in (2, 3, 4):  # a whole UTF-8 character: U+0085, U+00A0, U+2000.., U+3000
        try:
            return (data[-n:] if at_end else data[:n]).decode("utf-8").isspace()
        except UnicodeDecodeError:
            continue
    return False


def _is_space_start(data: bytes) -> bool:
    return _edge_is_space(data, at_end=False)


def _is_space_end(data: bytes) -> bool:
    return _edge_is_space(data, at_end=True)


def boundary_ids(tokens: Tokenization) -> list[int]:
    """B: the ids whose piece starts with whitespace, the EOS token and every special token
    (computed once per tokenizer and kept on `tokens`)."""
    hit = getattr(tokens, "_boundary_ids", None)
    if hit is not None:
        return hit
    eos = tokens.tokenizer.eos_token_id
    ids = [
        i for i in range(tokens.vocab_size)
        if i == eos or tokens.is_special(i) or _is_space_start(tokens.piece_bytes(i))
    ]  # fmt: skip
    tokens._boundary_ids = ids  # type: ignore[attr-defined]
    tokens._boundary_set = frozenset(ids)  # type: ignore[attr-defined]
    return ids


def boundary_set(tokens: Tokenization) -> frozenset[int]:
    boundary_ids(tokens)
    return tokens._boundary_set  # type: ignore[attr-defined]


def boundary_mask(tokens: Tokenization, width: int) -> Any:
    """B as a boolean tensor of `width` (the logits' columns, which may pad the vocabulary)."""
    import torch

    mask = torch.zeros(width, dtype=torch.bool)
    ids = [i for i in boundary_ids(tokens) if i < width]
    mask[torch.tensor(ids, dtype=torch.int64)] = True
    return mask


def text_words(text: str) -> list[tuple[int, int]]:
    """`[start, end)` of each maximal run of non-whitespace characters of `text`."""
    out, start = [], None
    for i, ch in enumerate(text):
        if ch.isspace():
            if start is not None:
                out.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        out.append((start, len(text)))
    return out


def check_offsets(value: Any, field: str = "loglikelihood.words") -> list[tuple[int, int]]:
    """User words as `[start, end]` pairs: integers, in order, not overlapping, not empty."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{field} must be true or a non-empty list of [start, end] offsets")
    out: list[tuple[int, int]] = []
    for i, pair in enumerate(value):
        where = f"{field}[{i}]"
        if (
            not isinstance(pair, (list, tuple)) or len(pair) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in pair)
        ):  # fmt: skip
            raise WordsError(where, f"{where} must be a [start, end] pair of character offsets")
        start, end = pair
        if not 0 <= start < end:
            raise WordsError(where, f"{where} is [{start}, {end}]: need 0 <= start < end")
        if out and start < out[-1][1]:
            raise WordsError(
                where, f"{where} is [{start}, {end}]: it starts before the end of {field}[{i - 1}] "
                f"({out[-1][1]}); words must be in order and not overlap",
            )  # fmt: skip
        out.append((start, end))
    return out


class WordsError(ValueError):
    """Bad word offsets: `field` names the word (`loglikelihood.words[i]`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _text(part: bytes | str) -> str:
    return part if isinstance(part, str) else part.decode("utf-8", errors="replace")


def _char_bytes(text: str) -> list[int]:
    """The UTF-8 byte offset of each character of `text`, and of its end."""
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8", errors="surrogatepass")))
    return out


def layout(
    tokens: Tokenization,
    text: str,
    token_ids: Sequence[int],
    trims: Sequence[bool],
    words: bool | Sequence[tuple[int, int]],
    corrected: bool,
    first_unscored: int | None = None,
    field: str = "loglikelihood.words",
) -> WordLayout:
    """Lay the words of `text` on its scored tokens (`token_ids`, with the dummy-prefix `trims`
    of each). `words` is True (runs of non-whitespace) or the user's `[start, end)` offsets,
    which may not split a token between two words (a token may run on into whitespace).
    `first_unscored` is the prompt's first token, when the text is a prompt's scored tokens:
    the word it starts has no logprob for its first token, and is left out."""
    pieces = [tokens.text_bytes(t, trim) for t, trim in zip(token_ids, trims, strict=True)]
    ends = []
    at = 0
    for p in pieces:
        at += len(p)
        ends.append(at)
    starts = [e - len(p) for e, p in zip(ends, pieces)]
    scored: bytes | str = b"".join(pieces)
    data: bytes | str = text.encode("utf-8", errors="surrogatepass")
    base = scored.find(data) if data else 0
    char_at = _char_bytes(text)
    if base < 0:
        base = _split_start(scored, data, text)
    if base is None and scored.decode("utf-8", errors="replace") == text:
        # Token ids that split a character (the text shows U+FFFD there): the tokens are laid
        # on the text's characters instead of its bytes, each token over every character that
        # one of its bytes is in (a character split over several tokens is in each of them).
        starts, ends = _token_chars(scored, starts, ends)
        scored, data, base, char_at = text, text, 0, list(range(len(text) + 1))
    elif base is None:  # a template that strips the message's content
        stripped = text.strip()
        shift_chars = text.find(stripped) if stripped else 0
        base = scored.find(stripped.encode("utf-8")) if stripped else -1
        if base < 0:
            raise ValueError("the scored tokens do not spell the text, so its words cannot be located")
        base -= len(text[:shift_chars].encode("utf-8"))
    user = words is not True
    spans = text_words(text) if not user else list(words)  # type: ignore[arg-type]
    out: list[Word] = []
    for i, (cs, ce) in enumerate(spans):
        where = f"{field}[{i}]"
        if user and ce > len(text):
            raise WordsError(where, f"{where} is [{cs}, {ce}]: the text has {len(text)} characters")
        ws, we = base + char_at[cs], base + char_at[ce]
        first = bisect.bisect_right(ends, ws)
        last = bisect.bisect_left(starts, we) - 1
        if first > last or first >= len(pieces):
            if user:
                raise WordsError(where, f"{where} ({text[cs:ce]!r}) has no scored token")
            continue
        if user:
            # A text that starts inside the first scored token's character has a negative base:
            # offsets before the scored bytes are clamped to them (never Python's from-the-end).
            lo, hi = max(starts[first], base, 0), min(ends[last], base + len(data))
            left, right = scored[lo : max(ws, lo)], scored[max(we, 0) : max(hi, 0)]
            outside = _text(left) + _text(right)
            if outside.strip():
                bad = first if _text(left).strip() else last
                raise WordsError(
                    where,
                    f"{where} ({text[cs:ce]!r}) splits the token {tokens.token(token_ids[bad])[0]!r} "
                    "with text outside the word: a word must hold its tokens whole (a token may "
                    "run on into whitespace)",
                )
        elif out and first <= out[-1].last:  # one token holds the end of the last word too
            prev = out.pop()
            cs, first = prev.offset, prev.first
        out.append(Word(
            text=text[cs:ce], offset=cs, first=first, last=last,
            starts_in_b=token_ids[first] in boundary_set(tokens),
            ends_itself=_is_space_end(tokens.piece_bytes(token_ids[last])),
        ))  # fmt: skip
    left_out = 0
    if first_unscored is not None and not user:
        head = tokens.piece_bytes(first_unscored)
        if head.strip() and not tokens.is_special(first_unscored):
            left_out = 1
            # The first scored token continues the unscored token's word: that word's first
            # token has no logprob, so the rest of it is left out too.
            if (
                out and out[0].first == 0 and not _is_space_end(head)
                and not _is_space_start(pieces[0]) and starts[0] >= base + char_at[out[0].offset]
            ):  # fmt: skip
                out.pop(0)
    return WordLayout(tuple(out), corrected, left_out)


def _split_start(scored: bytes | str, data: bytes | str, text: str) -> int | None:
    """Where `text` starts in the scored bytes when the scored tokens start inside its first
    character (`vllm_loglik.scoring.scored_text` puts that whole character at the text's
    start): a negative offset, the bytes of that character before the first scored token;
    None where that is not so."""
    if not text or not isinstance(data, bytes):
        return None
    size = len(text[0].encode("utf-8", errors="surrogatepass"))
    for cut in range(1, size):
        if scored.startswith(data[cut:size]) and scored.find(data[cut:]) == 0:
            return -cut
    return None


def _token_chars(
    scored: bytes, starts: list[int], ends: list[int]
) -> tuple[list[int], list[int]]:
    """Each token's `[first, last + 1)` characters in `scored` decoded with replacement: the
    character of a byte is the last one of the prefix that ends with it (a prefix that stops
    inside a character decodes it as one replacement character, as the whole text does)."""

    def char_of(byte: int) -> int:
        return len(scored[: byte + 1].decode("utf-8", errors="replace")) - 1

    first, last = [], []
    for s, e in zip(starts, ends, strict=True):
        at = char_of(s) if e > s else (char_of(s - 1) + 1 if s else 0)  # an empty token: after
        first.append(at)
        last.append(char_of(e - 1) + 1 if e > s else at)
    return first, last


def log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0, accurately near 0 and far below it."""
    if x >= 0:
        return -math.inf
    return math.log(-math.expm1(x)) if x > -0.693 else math.log1p(-math.exp(x))


def word_scores(
    words: WordLayout,
    logprobs: Sequence[float],
    starts: Sequence[float] | None,
    ends: Sequence[float] | None,
) -> list[WordScore]:
    """Each word's numbers from its tokens' logprobs and, when corrected, the log P_B of each
    token's row (`starts`) and of the row after it (`ends`)."""
    out = []
    for w in words.words:
        total = math.fsum(logprobs[w.first : w.last + 1])
        value = total
        if words.corrected:
            if starts is None or ends is None:
                raise ValueError("corrected word probabilities need the engine's word-boundary mass")
            before = starts[w.first] if w.starts_in_b else log1mexp(starts[w.first])
            after = 0.0 if w.ends_itself else ends[w.last]
            value = total + after - before
        out.append(WordScore(w.text, w.offset, w.last - w.first + 1, value, total))
    return out

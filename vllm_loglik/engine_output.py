"""Reading the prompt logprobs that vLLM's engine returns, in the layout of either model runner.

This is the one module that knows how `RequestOutput.prompt_logprobs` is laid out. The offline
API and the server both read the engine's output through `span_logprobs`, so a change in vLLM's
layout is handled here, once. Nothing here imports vLLM.

For a prompt of `n` tokens, the entry of position `p >= 1` is a mapping `{token_id: Logprob}`
that holds log P(token | tokens before p) for the actual token and the top k alternatives.
When a request read `c` tokens from the prefix cache (`RequestOutput.num_cached_tokens`), the
engine computed only positions `c + 1 .. n - 1`, and the two model runners of vLLM 0.32 return
them differently:

* **V1** (`vllm/v1/worker/gpu_model_runner.py`, `_get_prompt_logprobs_dict`; the CPU build, and
  GPUs without Triton) allocates a row for every position and fills them from
  `num_computed_tokens` on. The list has `n` entries: `[None, row 1, ..., row n-1]`, and the rows
  of positions `1 .. c` are left unset (their contents are whatever the buffer held)::

      n = 6, c = 3:   [None, ?, ?, ?, lp4, lp5]        entry of position p at index p

* **V2** (`vllm/v1/worker/gpu/sample/prompt_logprob.py`; the default on a GPU) returns rows only
  for the positions it computed. The list has `n - c` entries::

      n = 6, c = 3:   [None, lp4, lp5]                 entry of position p at index p - c

With no cache hit (`c = 0`) both are `[None, lp1, ..., lp(n-1)]`.

Either list comes in one of two containers. By default it is a Python list of dicts. With
`SamplingParams(flat_logprobs=True)` it is a `vllm.logprobs.FlatLogprobs`: the same positions as
flat columns (`token_ids`, `logprobs`, `ranks`, and `start_indices`/`end_indices` per position),
where a position's first item is the prompt's own token and the next `k` are the top `k` in
rank order. The server asks for the flat container, which saves vLLM's API-server process a dict
and a `Logprob` object per position, and reads its columns directly here.

`span_logprobs` reads the scored positions of a span in either layout and either container into
`ScoredRows`, and checks each position (present, and holding the prompt's token). When it cannot, it returns None, and
the caller scores the span again without the cache, where both layouts are the same; if even
that cannot be read, the engine's output is inconsistent, which is an `EngineOutputError`: a
fault of the server, never of the client's request.

The layouts above are those of the vLLM code in `RELIES_ON`. Where the installed vLLM's code of
any of it differs from every version it was verified on (`vllm_loglik.fingerprints`), the
package reads no prefix cache at all (`engine_requests.prefix_block_size` is None): every span
is computed whole, where both runners return `[None, lp1, ..., lp(n-1)]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .reliance import Reliance
from .spans import Span

#: The vLLM code whose output layouts this module reads: the containers, both runners' rows, and
#: the output processor's step that turns the rows into `RequestOutput.prompt_logprobs`.
RELIES_ON = Reliance(
    "output_layout",
    (
        "vllm.logprobs",
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_prompt_logprobs_dict",
        "vllm.v1.worker.gpu.sample.prompt_logprob",
        "vllm.v1.engine.logprobs:LogprobsProcessor._update_prompt_logprobs",
    ),
    "no prefix-cache reads (every span computed whole)",
)
#: The token id of the two word-boundary columns (`vllm_loglik.target_logprobs.WORDS_ID`).
WORDS_ID = -1
#: The fallback reason of a scoring request computed without prefix-cache reads because the
#: installed vLLM's code differs.
FALLBACK_REASON = "cache_reads"


class EngineOutputError(RuntimeError):
    """The engine's output for a span cannot be read: an internal fault, not bad input."""


@dataclass(slots=True)
class ScoredRows:
    """The scored positions of a span, as columns: per position, the logprob and rank of the
    prompt's own token, and (when asked for) the top alternatives, best first, as
    `(token_id, logprob)` pairs."""

    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]] | None = None
    #: With word-boundary masses (`words=True`): per position, log P_B of the distribution that
    #: predicts its token (`starts`) and of the next one, after its token (`ends`).
    starts: list[float] | None = None
    ends: list[float] | None = None

    def __len__(self) -> int:
        return len(self.logprobs)


def _offset(n: int, length: int, cached: int, span: Span) -> int | None:
    """Where position `p`'s row is (`p - offset`) in a list of `length` rows, or None."""
    if cached < 0 or span.start <= cached:
        return None  # the row predicting the first scored token was never computed
    if length == n:
        return 0  # V1, or no cache hit
    if cached and length == n - cached:
        return cached  # V2 after a cache hit
    return None


def _from_dicts(
    rows: Sequence[Mapping[int, Any] | None], ids: Sequence[int], start: int, offset: int, k: int
) -> ScoredRows | None:
    logprobs, ranks = [], []
    top: list[list[tuple[int, float]]] | None = [] if k else None
    for pos in range(start, len(ids)):
        entry = rows[pos - offset]
        actual = entry.get(ids[pos]) if entry else None
        if actual is None:
            return None
        logprobs.append(actual.logprob)
        ranks.append(actual.rank if actual.rank is not None else 0)
        if top is not None:
            best = sorted(entry.items(), key=lambda kv: kv[1].logprob, reverse=True)[:k]
            top.append([(alt_id, alt.logprob) for alt_id, alt in best])
    return ScoredRows(logprobs, ranks, top)


def _from_flat(
    flat: Any, ids: Sequence[int], start: int, offset: int, k: int, words: bool = False
) -> ScoredRows | None:
    starts = flat.start_indices[start - offset : len(ids) - offset]
    ends = flat.end_indices[start - offset : len(ids) - offset]
    token_ids, all_logprobs, all_ranks = flat.token_ids, flat.logprobs, flat.ranks
    if any(e <= s for s, e in zip(starts, ends)):
        return None  # an empty position
    if [token_ids[s] for s in starts] != ids[start:]:
        return None  # a position that does not hold the prompt's token first
    logprobs = [all_logprobs[s] for s in starts]
    ranks = [all_ranks[s] if all_ranks[s] is not None else 0 for s in starts]
    top = None
    if k:
        top = [
            list(zip(token_ids[s + 1 : min(e, s + 1 + k)], all_logprobs[s + 1 : min(e, s + 1 + k)]))
            for s, e in zip(starts, ends)
        ]
    rows = ScoredRows(logprobs, ranks, top)
    if words:
        if any(e - s != k + 3 or token_ids[e - 2] != WORDS_ID or token_ids[e - 1] != WORDS_ID
               for s, e in zip(starts, ends)):  # fmt: skip
            raise EngineOutputError(
                "the engine returned no word-boundary masses: its prompt logprobs came from "
                "vLLM's own path, not vllm-loglik's target-only one"
            )
        rows.starts = [all_logprobs[e - 2] for e in ends]
        rows.ends = [all_logprobs[e - 1] for e in ends]
    return rows


def span_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
    num_cached_tokens: int | None,
    span: Span,
    top_logprobs: int = 0,
    words: bool = False,
    masses: Any = None,
) -> ScoredRows | None:
    """The scored positions of `span` (`span.start .. n-1`) as `ScoredRows`, or None.

    None means that they cannot be read from this output: the list has neither layout's length,
    the cache covered a scored position (its row was never computed), or a position is missing
    or does not hold the prompt's token. `top_logprobs` alternatives are kept per position (the
    engine must have been asked for at least that many).
    """
    if prompt_logprobs is None:
        return None
    ids = span.prompt_token_ids
    offset = _offset(len(ids), len(prompt_logprobs), num_cached_tokens or 0, span)
    if offset is None:
        return None
    if hasattr(prompt_logprobs, "start_indices"):  # vLLM's FlatLogprobs
        rows = _from_flat(
            prompt_logprobs, ids, span.start, offset, top_logprobs, words and masses is None
        )
    elif words and masses is None:
        raise EngineOutputError("word-boundary masses are read from vLLM's flat container only")
    else:
        rows = _from_dicts(prompt_logprobs, ids, span.start, offset, top_logprobs)
    if rows is not None and words and masses is not None:
        rows.starts, rows.ends = _from_masses(masses, len(rows))
    if rows is not None and any(lp != lp for lp in rows.logprobs):
        # NaN: the engine's patch could not compute what the request asked for (a temperature,
        # `vllm_loglik.v2_scoring`); never a number passed on.
        raise EngineOutputError("the engine returned NaN prompt logprobs")
    return rows


def _from_masses(masses: Any, n: int) -> tuple[list[float], list[float]]:
    """`(starts, ends)` from V2's token-id scores of a words request (`vllm_loglik.v2_scoring`):
    `[rows, 2]`, one row per scored position, each a finite log P_B."""
    import math

    values = masses.tolist() if hasattr(masses, "tolist") else masses
    if len(values) != n or any(
        len(row) != 2 or not all(math.isfinite(v) for v in row) for row in values
    ):
        raise EngineOutputError(
            "the engine returned no word-boundary masses: vllm-loglik's V2 patch did not "
            "compute them (vllm_loglik.v2_scoring)"
        )
    return [row[0] for row in values], [row[1] for row in values]


def unreadable_reason(
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
    num_cached_tokens: int | None,
    span: Span,
) -> str:
    """Why `span_logprobs` could not read this output (it returned None), for the server's
    fallback metric: `layout` (no prompt logprobs, or a list of neither layout's length),
    `cached_scored_position` (the cache covered a scored position, whose row was never
    computed), `missing_entry` (a scored position with no row or no entry), or `wrong_token`
    (a position whose row does not hold the prompt's token)."""
    if prompt_logprobs is None:
        return "layout"
    ids = span.prompt_token_ids
    cached = num_cached_tokens or 0
    if cached < 0 or span.start <= cached:
        return "cached_scored_position"
    offset = _offset(len(ids), len(prompt_logprobs), cached, span)
    if offset is None:
        return "layout"
    if hasattr(prompt_logprobs, "start_indices"):
        for pos in range(span.start, len(ids)):
            s, e = prompt_logprobs.start_indices[pos - offset], prompt_logprobs.end_indices[pos - offset]
            if e <= s:
                return "missing_entry"
            if prompt_logprobs.token_ids[s] != ids[pos]:
                return "wrong_token"
        return "layout"
    for pos in range(span.start, len(ids)):
        entry = prompt_logprobs[pos - offset]
        if not entry:
            return "missing_entry"
        if ids[pos] not in entry:
            return "wrong_token"
    return "layout"


#: Every reason that `unreadable_reason` gives.
UNREADABLE_REASONS = ("layout", "cached_scored_position", "missing_entry", "wrong_token")


def require_span_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
    num_cached_tokens: int | None,
    span: Span,
    request_id: str,
    top_logprobs: int = 0,
    words: bool = False,
    masses: Any = None,
) -> ScoredRows:
    """`span_logprobs`, for an output that must be readable (one computed without the cache)."""
    rows = span_logprobs(prompt_logprobs, num_cached_tokens, span, top_logprobs, words, masses)
    if rows is None:
        got = "no" if prompt_logprobs is None else len(prompt_logprobs)
        raise EngineOutputError(
            f"engine request {request_id}: cannot read prompt logprobs ({got} entries, "
            f"{num_cached_tokens or 0} cached tokens) for a prompt of "
            f"{len(span.prompt_token_ids)} tokens scored from position {span.start}"
        )
    return rows

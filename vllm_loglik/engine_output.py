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

With no cache hit (`c = 0`) both are `[None, lp1, ..., lp(n-1)]`. `SamplingParams.flat_logprobs`
returns a `FlatLogprobs` in the same layout, whose empty positions read as `{}`.

`span_logprobs` reads the scored positions of a span in either layout, and checks each entry
(present, and holding the prompt's token at that position). When it cannot, it returns None, and
the caller scores the span again without the cache, where both layouts are the same; if even
that cannot be read, the engine's output is inconsistent, which is an `EngineOutputError`: a
fault of the server, never of the client's request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .spans import Span


class EngineOutputError(RuntimeError):
    """The engine's output for a span cannot be read: an internal fault, not bad input."""


def span_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
    num_cached_tokens: int | None,
    span: Span,
) -> list[Mapping[int, Any]] | None:
    """The entries of `span`'s scored positions (`span.start .. n-1`), in order, or None.

    None means that they cannot be read from this output: the list has neither layout's length,
    the cache covered a scored position (its row was never computed), or an entry is missing or
    does not hold the prompt's token.
    """
    if prompt_logprobs is None:
        return None
    ids = span.prompt_token_ids
    n, cached = len(ids), num_cached_tokens or 0
    if cached < 0 or span.start <= cached:
        return None
    if len(prompt_logprobs) == n:
        offset = 0  # V1, or no cache hit
    elif cached and len(prompt_logprobs) == n - cached:
        offset = cached  # V2 after a cache hit
    else:
        return None
    entries = []
    for pos in range(span.start, n):
        entry = prompt_logprobs[pos - offset]
        if not entry or ids[pos] not in entry:
            return None
        entries.append(entry)
    return entries


def require_span_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None] | None,
    num_cached_tokens: int | None,
    span: Span,
    request_id: str,
) -> list[Mapping[int, Any]]:
    """`span_logprobs`, for an output that must be readable (one computed without the cache)."""
    entries = span_logprobs(prompt_logprobs, num_cached_tokens, span)
    if entries is None:
        got = "no" if prompt_logprobs is None else len(prompt_logprobs)
        raise EngineOutputError(
            f"engine request {request_id}: cannot read prompt logprobs ({got} entries, "
            f"{num_cached_tokens or 0} cached tokens) for a prompt of "
            f"{len(span.prompt_token_ids)} tokens scored from position {span.start}"
        )
    return entries

"""Echo acceleration: scoring-only `/v1/completions` requests read each shared context once.

Most clients score with `echo: true`, `logprobs: k` and `max_tokens` 0 or 1, one prompt per
(context, continuation) pair: lm-eval's `local-completions`, OpenCompass, HELM, home-made
clients. TRL's teacher client sends `prompt_logprobs: k` and `max_tokens: 1` instead, a GRPO
group's sequences (one prompt, n completions) in one request. vLLM answers each by computing
the whole prompt again, because a request with prompt logprobs never reads the prefix cache. With the plugin, such a request (`echo_plan` says which)
is still answered by vLLM's own completion handler, in its own response shape, but the engine
requests it makes go through `EchoEngineClient`, which computes them like this:

1. **Known rows.** `PrefixRows` keeps, per adapter, cache salt and `k`, the prompt logprobs
   that earlier echo prompts computed (each position's own token, its top `k`, its rank), in
   blocks of `granularity` positions keyed by the tokens up to and including the block's last
   scored token (an LRU bounded in bytes). A prompt takes the rows of its longest known prefix;
   where another request is computing that prefix at the same moment, it waits for it.
2. **The tail.** One engine request with the client's own sampling parameters, plus
   `prompt_logprobs=k`, reading the prefix cache (`skip_reading_prefix_cache=False`): the
   engine computes only the positions after its cached blocks. With nothing known, the
   request does not read the cache (rows the engine skipped could not be filled in). The
   rows it returns are read by `vllm_loglik.engine_output.span_logprobs` (both model
   runners' layouts); where they do not reach the known rows (the engine had cached more
   than is known here), the prompt is computed again without the cache, counted on
   `fallbacks_total`.
3. **vLLM's output, rebuilt.** The rows are turned into `RequestOutput.prompt_logprobs` by
   vLLM's own `LogprobsProcessor` (the engine's output processor: the same `Logprob` entries,
   decoded tokens and UTF-8 corrections), and the generated token's text and logprobs by
   vLLM's own `IncrementalDetokenizer` and `LogprobsProcessor` (stop strings included), as the
   output processor makes them. The tail request runs with `detokenize=False`, because vLLM
   would detokenize the rows of cached positions that it never computed (and die).

The completion handler then builds the response from that output exactly as without the
plugin: `choices`, `logprobs.tokens`, `token_logprobs`, `top_logprobs`, `text_offset`,
`prompt_logprobs`, `usage`, the generated token.

What this relies on in vLLM (`RELIES_ON`; where the installed vLLM's code of any of it differs
from that of every version it was verified on, `vllm_loglik.fingerprints` says so and echo
requests are left to vLLM, as they are with `VLLM_LOGLIK_ECHO=0`, each counted on
`fallbacks_total{reason="echo_path"}`):

- `OpenAIServingCompletion._create_completion` calls `self.engine_client.generate(engine_input,
  sampling_params, request_id, lora_request=..., ...)` once per prompt and builds the response
  with `request_output_to_completion_response`: the plugin sets the completion handler's
  `engine_client` to an `EchoEngineClient`, which passes every call through unchanged unless
  the route marked the request (a context variable) and the call is that request's.
- `vllm.v1.engine.logprobs.LogprobsProcessor` (`_update_prompt_logprobs`,
  `_update_sample_logprobs`) and `vllm.v1.engine.detokenizer.IncrementalDetokenizer`: what the
  output processor (`vllm/v1/engine/output_processor.py`) uses to make a request's output.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..engine_output import (
    EngineOutputError,
    require_span_logprobs,
    span_logprobs,
    unreadable_reason,
)
from ..engine_requests import last_output
from ..reliance import Reliance, checked
from ..spans import Span
from ..engine_marks import MARK, switched_off

logger = logging.getLogger("vllm.loglik.server")

#: Set to 0 to leave every echo request to vLLM.
ENV = "VLLM_LOGLIK_ECHO"
#: The memory that the known rows may take, in MiB.
ENV_CACHE_MB = "VLLM_LOGLIK_ECHO_CACHE_MB"
DEFAULT_CACHE_MB = 256
#: The vLLM code that echo acceleration relies on: the completion handler that calls the engine
#: client and builds the response, and the output processor's code that it runs to make the
#: `RequestOutput` the handler reads.
RELIES_ON = Reliance(
    "echo",
    (
        "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion._create_completion",
        "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion.request_output_to_completion_response",
        "vllm.v1.engine.output_processor:RequestState._new_request_output",
        "vllm.v1.engine.output_processor:RequestState._new_completion_output",
        "vllm.v1.engine.logprobs:LogprobsProcessor",
        "vllm.v1.engine.detokenizer",
        "vllm.logprobs",
    ),
    "echo requests left to vLLM",
)
#: The fallback reason of an echo request that only scores, left to vLLM because the
#: installed vLLM's code differs.
FALLBACK_REASON = "echo_path"
#: Known rows are kept in blocks of at most this many positions (the engine's KV block size,
#: where it is smaller): a finer grain than the engine's blocks lets a prompt reuse more.
GRANULARITY = 16
#: The most alternatives per position that an accelerated request asks for (OpenAI's limit
#: for `logprobs` on completions is 5; vLLM allows up to `--max-logprobs`).
MAX_K = 20
#: Bytes that a block of known rows costs besides its arrays (measured: the arrays' headers, the
#: `Rows` object, the key and the LRU's entry).
BLOCK_OVERHEAD = 670

#: The plan of the echo request being handled (set by the route, read by `EchoEngineClient`).
PLAN: contextvars.ContextVar[EchoPlan | None] = contextvars.ContextVar("vllm_loglik_echo", default=None)


@dataclass(frozen=True)
class EchoPlan:
    """An accelerated echo request: the `logprobs` it asks for, and the model's label."""

    k: int
    model: str


def echo_plan(request: Any, model: str) -> EchoPlan | None:
    """The plan for a `/v1/completions` request that only scores, or None for any other
    request (which vLLM answers as it always does). Two shapes score:

    * `echo` with `logprobs` 0..`MAX_K` and no `prompt_logprobs` of its own (lm-eval's
      `local-completions`, HELM, OpenCompass);
    * `prompt_logprobs` 0..`MAX_K` without `echo` (TRL's `VLLMClient.get_sequence_logprobs`:
      token-id sequences, `max_tokens: 1`), its `logprobs` (the generated token's), if any,
      0..`MAX_K` too;

    each with `max_tokens` 0 or 1, one choice, no streaming, no `logprob_token_ids`, no beam
    search, no stop strings, no prompt embeddings, no KV transfer."""
    if request.stream or request.use_beam_search:
        return None
    if request.echo:
        k = request.logprobs
        if request.prompt_logprobs is not None:
            return None
    else:
        k = request.prompt_logprobs
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_K:
            return None
    if k is None or not 0 <= k <= MAX_K or request.max_tokens not in (0, 1):
        return None
    if (request.n or 1) != 1:
        return None
    if request.logprob_token_ids or request.stop or request.prompt_embeds is not None:
        return None
    if request.kv_transfer_params or getattr(request, "ec_transfer_params", None):
        return None
    return EchoPlan(k, model)


def problem(block_size: int | None, lora_problem: str | None) -> str | None:
    """Why echo requests are left to vLLM on this server, or None where they are accelerated."""
    if switched_off(ENV):
        return f"turned off ({ENV}=0)"
    if block_size is None:
        return "no prefix-cache reads (prefix caching is off, or see prefix-cache reads)"
    if lora_problem is not None:
        return "LoRA on the output layer (see the loglikelihood requests' warning)"
    return checked(RELIES_ON).reason()


def cache_bytes() -> int:
    raw = os.environ.get(ENV_CACHE_MB, str(DEFAULT_CACHE_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_CACHE_MB} must be a number of MiB, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"{ENV_CACHE_MB} must not be negative, got {raw!r}")
    return int(mb * 2**20)


@dataclass(slots=True)
class Rows:
    """Prompt-logprob rows as the engine makes them, one per position: the position's own token
    and its top `k` (`token_ids`, `logprobs`, `[n, k + 1]`), and the own token's rank."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray

    @property
    def nbytes(self) -> int:
        """The arrays' bytes, and what a block costs besides (its key, the objects)."""
        return self.token_ids.nbytes + self.logprobs.nbytes + self.ranks.nbytes + BLOCK_OVERHEAD

    def __getitem__(self, index: slice) -> Rows:
        return Rows(self.token_ids[index], self.logprobs[index], self.ranks[index])

    def copy(self) -> Rows:
        """Rows that own their arrays (a slice keeps the whole of what it was cut from)."""
        return Rows(self.token_ids.copy(), self.logprobs.copy(), self.ranks.copy())

    @staticmethod
    def concat(parts: Sequence[Rows], k: int) -> Rows:
        if not parts:
            empty = np.zeros((0, k + 1))
            return Rows(empty.astype(np.int32), empty.astype(np.float32), np.zeros(0, np.int32))
        return Rows(
            np.concatenate([p.token_ids for p in parts]),
            np.concatenate([p.logprobs for p in parts]),
            np.concatenate([p.ranks for p in parts]),
        )


def rows_of(scored: Any, ids: Sequence[int], k: int) -> Rows:
    """`Rows` from `ScoredRows` (`vllm_loglik.engine_output`) of the positions holding `ids`."""
    n = len(scored.logprobs)
    token_ids = np.zeros((n, k + 1), np.int32)
    logprobs = np.zeros((n, k + 1), np.float32)
    token_ids[:, 0] = ids
    logprobs[:, 0] = scored.logprobs
    if k:
        for i, top in enumerate(scored.top):
            if len(top) != k:
                raise EngineOutputError(f"the engine returned {len(top)} alternatives, not {k}")
            token_ids[i, 1:] = [t for t, _ in top]
            logprobs[i, 1:] = [lp for _, lp in top]
    return Rows(token_ids, logprobs, np.asarray(scored.ranks, np.int32))


@dataclass
class Lookup:
    """What `PrefixRows.acquire` found for a prompt: the known rows of its first `known`
    positions after the first, and the blocks it claimed (to compute and `release`)."""

    rows: list[Rows]
    known: int
    claims: list[tuple[int, tuple]] = field(default_factory=list)  # (block index, key)


class PrefixRows:
    """The LRU of known prompt-logprob rows (see the module docstring), and the blocks that
    requests in flight are computing. Used from the API server's event loop only."""

    def __init__(self, granularity: int, max_bytes: int):
        self.granularity = granularity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[tuple, Rows] = OrderedDict()
        self._pending: dict[tuple, asyncio.Future] = {}

    def keys(self, root: tuple, ids: Sequence[int]) -> list[tuple]:
        """The keys of a prompt's blocks: block `j` holds the rows of positions
        `j*g + 1 .. (j+1)*g`, which depend on the tokens up to position `(j+1)*g`."""
        g = self.granularity
        digest = hashlib.blake2b(repr(root).encode(), digest_size=16)
        array = np.asarray(ids, dtype=np.int64)
        keys = []
        for j in range((len(ids) - 1) // g):
            digest.update(array[j * g : (j + 1) * g].tobytes())
            keys.append((digest.copy().digest(), int(array[(j + 1) * g])))
        return keys

    async def acquire(self, root: tuple, ids: Sequence[int]) -> Lookup:
        """The known rows of the longest known prefix of `ids` (waiting for blocks that a
        request in flight computes), and claims on the rest of its blocks."""
        keys = self.keys(root, ids)
        found: list[Rows] = []
        while len(found) < len(keys):
            key = keys[len(found)]
            rows = self._blocks.get(key)
            if rows is not None:
                self._blocks.move_to_end(key)
                found.append(rows)
                continue
            pending = self._pending.get(key)
            if pending is None:
                break
            await asyncio.shield(pending)  # its owner stores the block, or gives up on it
            if key not in self._blocks:
                break
        claims = [(j, key) for j, key in enumerate(keys) if j >= len(found) and key not in self._pending]
        loop = asyncio.get_running_loop()
        for _, key in claims:
            self._pending[key] = loop.create_future()
        return Lookup(found, len(found) * self.granularity, claims)

    def release(self, lookup: Lookup, rows: Rows | None) -> None:
        """Store the claimed blocks from `rows` (every position after the first; None when the
        request failed) and wake the requests waiting for them."""
        g = self.granularity
        for j, key in lookup.claims:
            if rows is not None and self.max_bytes:
                block = rows[j * g : (j + 1) * g].copy()
                old = self._blocks.pop(key, None)
                self.bytes += block.nbytes - (old.nbytes if old is not None else 0)
                self._blocks[key] = block
            future = self._pending.pop(key, None)
            if future is not None and not future.done():
                future.set_result(None)
        while self.bytes > self.max_bytes and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.bytes -= evicted.nbytes


def _vllm_prompt_logprobs(rows: Rows, k: int, flat: bool, tokenizer: Any) -> Any:
    """`RequestOutput.prompt_logprobs` for these rows, made by vLLM's own output processor code."""
    from vllm.logprobs import create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    processor = LogprobsProcessor(
        tokenizer=tokenizer, logprobs=None, prompt_logprobs=create_prompt_logprobs(flat),
        cumulative_logprob=None, num_logprobs=None, num_prompt_logprobs=k,
    )  # fmt: skip
    if len(rows.ranks):
        processor._update_prompt_logprobs((rows.token_ids, rows.logprobs, rows.ranks))
    return processor.prompt_logprobs


def _sample_row(flat: Any) -> tuple[list[int], list[float], int] | None:
    """The generated token's row (`[token, top k]`, logprobs, rank) from the engine's output
    (a `FlatLogprobs`: the tail asks for `flat_logprobs`)."""
    if not flat:
        return None
    s, e = flat.start_indices[0], flat.end_indices[0]
    return list(flat.token_ids[s:e]), list(flat.logprobs[s:e]), flat.ranks[s]


def rebuild_output(out: Any, params: Any, prompt_ids: list[int], tokenizer: Any) -> None:
    """Make the generated token's `text` and `logprobs` of `out` (computed with
    `detokenize=False`) what vLLM's output processor makes with the client's `params`."""
    from vllm.logprobs import create_sample_logprobs
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer
    from vllm.v1.engine.logprobs import LogprobsProcessor

    completion = out.outputs[0]
    tokenizer = tokenizer if params.detokenize else None
    request = SimpleNamespace(
        sampling_params=params, prompt_token_ids=prompt_ids, prompt_embeds=None,
        request_id=out.request_id,
    )  # fmt: skip
    detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, request)
    new_ids = list(completion.token_ids)
    stop_string = detokenizer.update(new_ids, completion.finish_reason == "stop")
    if stop_string is not None:
        completion.finish_reason = "stop"
        completion.stop_reason = stop_string
    completion.token_ids = list(detokenizer.output_token_ids)
    completion.text = detokenizer.get_next_output_text(True, False)
    if params.logprobs is None or not new_ids:
        return
    row = _sample_row(completion.logprobs)
    if row is None:
        return
    token_ids, logprobs, rank = row
    processor = LogprobsProcessor(
        tokenizer=tokenizer, logprobs=create_sample_logprobs(params.flat_logprobs),
        prompt_logprobs=None, cumulative_logprob=0.0, num_logprobs=params.logprobs,
        num_prompt_logprobs=None,
    )  # fmt: skip
    processor._update_sample_logprobs(
        ([np.asarray(token_ids)], [np.asarray(logprobs, np.float32)], [np.asarray(rank)], None)
    )
    completion.logprobs = processor.logprobs
    completion.cumulative_logprob = processor.cumulative_logprob


@dataclass
class EchoStats:
    """What one accelerated prompt read and computed, for the metrics."""

    shared_tokens: int = 0
    fallback: str | None = None


class EchoEngineClient:
    """The completion handler's engine client: vLLM's own, except for the prompts of an echo
    request that the route marked (`PLAN`), which it computes as the module docstring says."""

    def __init__(self, engine: Any, scoring: Any, granularity: int, max_bytes: int):
        self._engine = engine
        self._scoring = scoring
        self.rows = PrefixRows(granularity, max_bytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        plan = PLAN.get()
        if plan is None or not self._takes(prompt, sampling_params, plan, args):
            return self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        return self._echo(plan, prompt, sampling_params, request_id, kwargs)

    @staticmethod
    def _takes(prompt: Any, params: Any, plan: EchoPlan, args: tuple) -> bool:
        return (
            not args
            and isinstance(prompt, dict)
            and prompt.get("type") == "token"
            and not prompt.get("multi_modal_data")
            and len(prompt.get("prompt_token_ids") or ()) >= 2
            and getattr(params, "prompt_logprobs", None) == plan.k
            and params.n == 1
            and params.max_tokens == 1
        )

    async def _echo(
        self, plan: EchoPlan, prompt: Any, params: Any, request_id: str, kwargs: dict
    ) -> AsyncGenerator[Any, None]:
        ids: list[int] = list(prompt["prompt_token_ids"])
        lora = kwargs.get("lora_request")
        root = (lora.lora_name if lora is not None else None, prompt.get("cache_salt"), plan.k)
        lookup = await self.rows.acquire(root, ids)
        stats = EchoStats(shared_tokens=lookup.known)
        computed: Rows | None = None
        try:
            out, tail = await self._tail(prompt, params, request_id, kwargs, ids, lookup, stats, plan.k)
            computed = Rows.concat([*lookup.rows, tail], plan.k)
        finally:
            self.rows.release(lookup, computed)
        tokenizer = self._engine.renderer.get_tokenizer() if params.detokenize else None
        out.prompt_logprobs = _vllm_prompt_logprobs(computed, plan.k, params.flat_logprobs, tokenizer)
        rebuild_output(out, params, ids, tokenizer)
        self._scoring.echo_answered(plan.model, stats)
        yield out

    async def _tail(
        self, prompt: Any, params: Any, request_id: str, kwargs: dict, ids: list[int],
        lookup: Lookup, stats: EchoStats, k: int,
    ) -> tuple[Any, Rows]:  # fmt: skip
        """The engine's output for the prompt, and the rows of its positions after the known
        ones; computed again without the cache where the cached run left a gap."""
        start = lookup.known + 1
        tail_params = params.clone()
        tail_params.prompt_logprobs = k
        tail_params.detokenize = False
        tail_params.flat_logprobs = True
        tail_params.skip_reading_prefix_cache = lookup.known == 0
        tail_params.extra_args = {**(params.extra_args or {}), MARK: True}
        if lookup.known and start < len(ids):
            # On V2's scoring fields, the rows from the first unknown one on: the engine reads
            # the cache up to there (its hit limit) and returns nothing before it.
            tail_params = self._scoring.runner.with_start(tail_params, start)
        if start >= len(ids):  # every row known: the engine only generates
            tail_params.prompt_logprobs = None
            tail_params.skip_reading_prefix_cache = False
        out = await self._final(prompt, tail_params, request_id, kwargs)
        if start >= len(ids):
            return out, Rows.concat([], k)
        span = Span(ids, start)
        scored = span_logprobs(out.prompt_logprobs, out.num_cached_tokens, span, k)
        if scored is None:
            stats.fallback = unreadable_reason(out.prompt_logprobs, out.num_cached_tokens, span)
            logger.debug("echo %s: computed again without the cache (%s)", request_id, stats.fallback)
            tail_params = tail_params.clone()
            tail_params.skip_reading_prefix_cache = True
            out = await self._final(prompt, tail_params, f"{request_id}-full", kwargs)
            scored = require_span_logprobs(
                out.prompt_logprobs, out.num_cached_tokens, span, out.request_id, k
            )
        return out, rows_of(scored, ids[start:], k)

    async def _final(self, prompt: Any, params: Any, request_id: str, kwargs: dict) -> Any:
        async with self._scoring.turn(kwargs.get("lora_request")):
            stream = self._engine.generate(prompt, params, request_id, **kwargs)
            return await last_output(stream, request_id)


def granularity_for(block_size: int) -> int:
    """Known rows are kept in blocks that divide the engine's KV blocks."""
    return math.gcd(block_size, GRANULARITY)

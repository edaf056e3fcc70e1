"""How the server computes prompt logprobs with vLLM's engine: `ServerScoring`.

Every span is one engine request with `SamplingParams(max_tokens=1, prompt_logprobs=k,
detokenize=False)`, sent through the `EngineClient` that the plugin receives in `init_state`,
as vLLM's own serving handlers send theirs. All spans of a request are in flight at once.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.datastructures import State

from ..engine_output import (
    EngineOutputError,
    ScoredRows,
    require_span_logprobs,
    span_logprobs,
)
from ..jobs import Job, Scorer
from ..protocol import DEFAULT_MAX_CONTINUATIONS
from ..scoring import Score
from ..spans import Span


class ScoringFault(RuntimeError):
    """Computing the scores failed inside the server: HTTP 500, never the client's 400.

    `ServerScoring.run` raises it for an `EngineOutputError` and for any exception of its own
    code; errors of the engine itself (`VLLMError`) pass through to vLLM's handlers.
    """


class ServerScoring:
    """Per-app state: the scorer, and the engine that computes prompt logprobs.

    Shared contexts are computed once. When the engine has prefix caching on, a request whose
    spans share a prefix of at least one KV block (the context of several continuations, or
    of one continuation: a client may send the same context again with the next one) first
    prefills that prefix as a plain request (no logprobs), which stores its full blocks in the
    prefix cache. The spans are then scored with `skip_reading_prefix_cache=False`, so the
    engine computes only the uncached tail. This is safe only with `detokenize=False`: vLLM
    leaves the cached positions' prompt logprobs unset, and detokenizing them kills the engine.
    The warm-up prefix stops one token before the first scored position, so the logits that
    predict the first scored token are always computed.

    The rows of a cached request come back in the layout of the engine's model runner (V1 on
    the CPU, V2 by default on a GPU); `vllm_loglik.engine_output.span_logprobs` reads both,
    aligned by `num_cached_tokens`. A span whose output cannot be read that way, for whatever
    reason (its cache hit reached a scored position, an unknown layout, a missing entry), is
    scored again without the cache. Only if that output cannot be read either is it an
    `EngineOutputError`: a server fault (HTTP 500), never a client's 400.
    """

    def __init__(self, engine_client: Any, state: State):
        self.engine = engine_client
        chat = getattr(state, "openai_serving_chat", None)
        self.scorer = Scorer(
            engine_client.renderer.get_tokenizer(),
            engine_client.model_config.max_model_len,
            chat_template=getattr(chat, "chat_template", None),
        )
        self.max_continuations = int(
            os.environ.get("VLLM_LOGLIK_MAX_CONTINUATIONS", DEFAULT_MAX_CONTINUATIONS)
        )
        cache = engine_client.vllm_config.cache_config
        self.block_size: int | None = cache.block_size if cache.enable_prefix_caching else None

    def shared_prefix(self, spans: Sequence[Span]) -> list[int] | None:
        """The prefix worth caching for `spans`, or None: their common prefix, cut one token
        before the first scored position, if it fills at least one KV block."""
        if self.block_size is None or not spans:
            return None
        first = spans[0].prompt_token_ids
        n = min(span.start for span in spans) - 1
        for span in spans[1:]:
            ids = span.prompt_token_ids
            n = min(n, len(ids))
            for i in range(n):
                if ids[i] != first[i]:
                    n = i
                    break
        return first[:n] if n >= self.block_size else None

    async def _generate(self, ids: list[int], params: Any, request_id: str) -> Any:
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id):
            final = out
        if final is None:
            raise EngineOutputError(f"engine request {request_id} returned no output")
        return final

    async def run(self, jobs: list[Job], top_logprobs: int, content: bool = True) -> list[Score]:
        """Score `jobs`: every span is its own engine request, all in flight at once.
        `content=False` computes only each job's totals (the compact response)."""
        from vllm.exceptions import VLLMError

        try:
            return await self._run(jobs, top_logprobs, content)
        except VLLMError:
            raise
        except Exception as e:
            raise ScoringFault(f"{type(e).__name__}: {e}") from e

    async def _run(self, jobs: list[Job], top_logprobs: int, content: bool) -> list[Score]:
        from vllm import SamplingParams

        base = uuid.uuid4().hex
        spans = [span for job in jobs for span in job.spans]
        prefix = self.shared_prefix(spans)
        if prefix is not None:
            await self._generate(prefix, SamplingParams(max_tokens=1), f"loglik-{base}-prefix")

        def params(read_cache: bool) -> Any:
            return SamplingParams(
                max_tokens=1,
                prompt_logprobs=top_logprobs,
                detokenize=False,  # required with cache reads: see the class docstring
                flat_logprobs=True,  # no dict or Logprob object per position in this process
                skip_reading_prefix_cache=not read_cache,
            )

        async def one(i: int, span: Span) -> ScoredRows:
            rid = f"loglik-{base}-{i}"
            if prefix is not None:
                out = await self._generate(span.prompt_token_ids, params(True), rid)
                scored = span_logprobs(
                    out.prompt_logprobs, out.num_cached_tokens, span, top_logprobs
                )
                if scored is not None:
                    return scored
                # The cache reached a scored position, or the output cannot be aligned in
                # either runner's layout: compute the whole prompt.
                rid += "-full"
            out = await self._generate(span.prompt_token_ids, params(False), rid)
            return require_span_logprobs(
                out.prompt_logprobs, out.num_cached_tokens, span, rid, top_logprobs
            )

        tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(spans)]
        try:
            scored = iter(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return [
            self.scorer.finish(job, [next(scored) for _ in job.spans], top_logprobs, content)
            for job in jobs
        ]

"""How the server computes prompt logprobs with vLLM's engine: `ServerScoring`, which runs the
protocol of `vllm_loglik.engine_requests` through the plugin's `EngineClient`."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import AbstractAsyncContextManager, nullcontext
from collections.abc import Callable
from typing import Any

from starlette.datastructures import State

from ..engine_output import FALLBACK_REASON as CACHE_READS_FALLBACK
from ..engine_output import ScoredRows
from ..engine_requests import (
    EngineRequest,
    ProtocolStats,
    cache_reads_problem,
    corrected_words_problem,
    engine_max_logprobs,
    fast_paths,
    last_output,
    lora_mixing_unsafe,
    lora_scoring_problem,
    prefix_block_size,
    run_async,
    score_spans,
)
from ..jobs import Job, Scorer
from ..reliance import checked
from ..runners import path_line, runner_of
from ..scoring import Score
from ..spans import Span
from ..target_logprobs import FALLBACK_REASON
from . import echo
from .limits import Limits
from .lora_turns import Turns
from .metrics import metrics, model_label

logger = logging.getLogger("vllm.loglik.server")


class ScoringFault(RuntimeError):
    """Computing the scores failed inside the server: HTTP 500, never the client's 400.

    `ServerScoring.run` raises it for an `EngineOutputError` and for any exception of its own
    code; errors of the engine itself (`VLLMError`) pass through to vLLM's handlers.
    """


class ServerScoring:
    """Per-app state: the scorer, and the engine that computes prompt logprobs.

    A request's spans are scored with the protocol of `vllm_loglik.engine_requests` (the same
    as the offline API's): a shared context is computed once when the engine has prefix caching
    on, and so is the context of a lone continuation, since a client may send the same context
    again with the next one. Each batch of the protocol's engine requests is
    sent through the `EngineClient` that the plugin receives in `init_state`, all at once, as
    vLLM's own serving handlers send theirs.
    """

    def __init__(self, engine_client: Any, state: State):
        self.engine = engine_client
        chat = getattr(state, "openai_serving_chat", None)
        self.scorer = Scorer(
            engine_client.renderer.get_tokenizer(),
            engine_client.model_config.max_model_len,
            chat_template=getattr(chat, "chat_template", None),
        )
        self.limits = Limits.from_env()
        #: The engine's cap on prompt logprobs per position (-1 in vLLM: the vocabulary's size).
        self.max_logprobs = engine_max_logprobs(engine_client.model_config)
        #: How this package scores on the engine's model runner (`vllm_loglik.runners`).
        self.runner = runner_of(engine_client.vllm_config)
        self.block_size = prefix_block_size(engine_client.vllm_config)
        #: Why the engine's prefix cache is not read although it is on (the installed vLLM's
        #: output layouts are not verified), if so: each scoring request is then counted.
        self.cache_reads_problem = cache_reads_problem(engine_client.vllm_config)
        if self.cache_reads_problem is not None:
            logger.warning("vllm-loglik reads no prefix cache: %s", self.cache_reads_problem)
        #: Why this engine's LoRA configuration cannot score, if it cannot (every scoring
        #: request is then a 501 with this message; see `lora_scoring_problem`).
        self.lora_problem = lora_scoring_problem(engine_client.vllm_config)
        if self.lora_problem is not None:
            logger.warning("loglikelihood requests will be refused: %s", self.lora_problem)
        #: Base-model and adapter scoring take turns where the engine would mix them up.
        self.turns = Turns() if lora_mixing_unsafe(engine_client.vllm_config) else None
        #: Why the engine computes prompt logprobs on vLLM's own path where its runner has a
        #: faster one (`vllm_loglik.runners`), if it does: each scoring request is then counted
        #: as a fallback.
        self.path_problem = self.runner.prompt_logprobs_problem
        if self.path_problem is not None:
            logger.warning("vllm-loglik scores with vLLM's own prompt logprobs: %s", self.path_problem)
        #: Why corrected word probabilities cannot be computed here (the request's 400), if so.
        self.words_problem = corrected_words_problem(
            engine_client.vllm_config, "loglikelihood.word_probability"
        )
        #: The `model` label of the base model in the metrics (a request without `model`).
        self.base_name = model_label(None, getattr(state, "openai_serving_models", None))
        #: Why echo requests are left to vLLM (`echo.py`), if they are; else the completion
        #: handler's engine client is an `EchoEngineClient` (`install_echo`).
        self.echo_problem = echo.problem(self.block_size, self.lora_problem)
        #: Echo acceleration is off because the installed vLLM's code differs: each echo
        #: request it would have answered is then counted as a fallback.
        verdict = checked(echo.RELIES_ON)
        self.echo_unverified = not verdict.holds and self.echo_problem == verdict.reason()
        self.echo: echo.EchoEngineClient | None = None

    def fast_paths(self) -> list[str]:
        """What the start-up line says of each fast path: on, or off and why."""
        return [
            *fast_paths(self.engine.vllm_config),
            path_line("echo acceleration", self.echo_problem),
        ]

    def install_echo(self, state: State) -> None:
        """Give the completion handler the engine client that accelerates echo requests."""
        handler = getattr(state, "openai_serving_completion", None)
        if handler is None or self.echo_problem is not None:
            if self.echo_problem is not None:
                logger.info("echo requests are answered by vLLM alone: %s", self.echo_problem)
            return
        self.echo = echo.EchoEngineClient(
            handler.engine_client, self, echo.granularity_for(self.block_size), echo.cache_bytes()
        )
        handler.engine_client = self.echo

    def echo_answered(self, model: str, stats: echo.EchoStats) -> None:
        if self.path_problem is not None:
            metrics().fallbacks.labels(FALLBACK_REASON).inc()
        metrics().echo_prompt(model, stats.shared_tokens, stats.fallback)

    async def _generate(self, request: EngineRequest, lora_request: Any) -> Any:
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        stream = self.engine.generate(
            prompt, request.params, request.request_id, lora_request=lora_request
        )
        return await last_output(stream, request.request_id)

    def turn(self, lora_request: Any) -> AbstractAsyncContextManager[Any]:
        """Where base-model and adapter requests must take turns in the engine (`Turns`), the
        turn of a request under `lora_request` (None: the base model); else nothing to wait for."""
        if self.turns is None:
            return nullcontext()
        return self.turns.turn(lora_request is not None)

    async def _run_batch(self, batch: list[EngineRequest], lora_request: Any) -> list[Any]:
        tasks = [asyncio.ensure_future(self._generate(r, lora_request)) for r in batch]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def run(
        self,
        jobs: list[Job],
        top_logprobs: int,
        content: bool | str = True,
        lora_request: Any = None,
        words: bool = False,
        temperature: float = 1.0,
    ) -> list[Score]:
        """Score `jobs`: every span is its own engine request, all in flight at once, under
        `lora_request` (None: the base model). `content=False` computes only each job's totals
        (the compact response), `"arrays"` those and the tokens' arrays; `words`, that the
        engine computes word-boundary masses (corrected word probabilities); a `temperature`
        other than 1, log softmax(logits / T) (checked by the caller). A request's warm-up runs under its adapter too: vLLM's prefix
        cache keys blocks by adapter, so a context is only ever read under the adapter that
        computed it."""

        def finish(rows: list[ScoredRows]) -> list[Score]:
            scored = iter(rows)
            return [
                self.scorer.finish(job, [next(scored) for _ in job.spans], top_logprobs, content)
                for job in jobs
            ]

        spans = [span for job in jobs for span in job.spans]
        return await self._guarded(spans, top_logprobs, lora_request, words, temperature, finish)

    async def rows(
        self, spans: list[Span], top_logprobs: int, lora_request: Any = None, temperature: float = 1.0
    ) -> list[ScoredRows]:
        """The engine's `ScoredRows` of each span, as `run` computes them; with a `temperature`
        other than 1, of log softmax(logits / T) (the caller has checked the runner's
        `temperature_problem`). Teacher logprobs (`vllm_loglik.teacher`) read these directly:
        no object per token."""
        return await self._guarded(spans, top_logprobs, lora_request, False, temperature, list)

    async def _guarded(
        self, spans: list[Span], top_logprobs: int, lora_request: Any, words: bool,
        temperature: float, finish: Callable[[list[ScoredRows]], list[Any]],
    ) -> list[Any]:  # fmt: skip
        from vllm.exceptions import VLLMError

        try:
            async with self.turn(lora_request):
                return await self._run(spans, top_logprobs, lora_request, words, temperature, finish)
        except VLLMError:
            raise
        except Exception as e:
            raise ScoringFault(f"{type(e).__name__}: {e}") from e

    async def _run(
        self, spans: list[Span], top_logprobs: int, lora_request: Any, words: bool,
        temperature: float, finish: Callable[[list[ScoredRows]], list[Any]],
    ) -> list[Any]:  # fmt: skip
        stats = ProtocolStats()
        protocol = score_spans(
            spans, top_logprobs, self.block_size, f"loglik-{uuid.uuid4().hex}", warm_single=True,
            stats=stats, words=words, runner=self.runner, temperature=temperature,
        )  # fmt: skip
        scored: list[ScoredRows] = []
        try:
            scored = await run_async(protocol, lambda b: self._run_batch(b, lora_request))
            return finish(scored)
        finally:
            if self.path_problem is not None and stats.requests:
                stats.fallbacks[FALLBACK_REASON] += stats.requests
            if self.cache_reads_problem is not None and stats.requests:
                stats.fallbacks[CACHE_READS_FALLBACK] += stats.requests
            label = lora_request.lora_name if lora_request is not None else self.base_name
            metrics().engine_work(label, stats, sum(len(rows) for rows in scored))

"""How the server computes prompt logprobs with vLLM's engine: `ServerScoring`, which runs the
protocol of `vllm_loglik.engine_requests` through the plugin's `EngineClient`."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from starlette.datastructures import State

from ..engine_output import EngineOutputError
from ..engine_requests import EngineRequest, prefix_block_size, run_async, score_spans
from ..jobs import Job, Scorer
from ..scoring import Score
from .limits import Limits


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
        self.block_size = prefix_block_size(engine_client.vllm_config)

    async def _generate(self, request: EngineRequest) -> Any:
        from vllm.inputs import TokensPrompt

        final = None
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        async for out in self.engine.generate(prompt, request.params, request.request_id):
            final = out
        if final is None:
            raise EngineOutputError(f"engine request {request.request_id} returned no output")
        return final

    async def _run_batch(self, batch: list[EngineRequest]) -> list[Any]:
        tasks = [asyncio.ensure_future(self._generate(request)) for request in batch]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

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
        spans = [span for job in jobs for span in job.spans]
        protocol = score_spans(
            spans, top_logprobs, self.block_size, f"loglik-{uuid.uuid4().hex}", warm_single=True
        )
        scored = iter(await run_async(protocol, self._run_batch))
        return [
            self.scorer.finish(job, [next(scored) for _ in job.spans], top_logprobs, content)
            for job in jobs
        ]

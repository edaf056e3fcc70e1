"""`POST /v1/completions` with `loglikelihood`: the prompt, or continuations of it."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from fastapi import Request

from ..jobs import Job, Scorer
from ..protocol import LoglikelihoodOptions
from ..spans import check_text
from .protocol import LoglikelihoodCompletionRequest, RequestError, error_response
from .responses import (
    as_entries,
    completion_response,
    merge,
    no_generation,
    scored_prompt_tokens,
)
from .validation import checked, top_logprobs_of


async def score_completion(request: LoglikelihoodCompletionRequest, raw_request: Request):
    try:
        scoring, options = checked(request, raw_request)
        if options.scope == "last_message":
            raise RequestError(
                "loglikelihood.scope",
                "loglikelihood.scope 'last_message' is only for /v1/chat/completions; "
                "completions score the prompt, continuations of it, or a rolling text",
            )
        if options.scope == "rolling" and options.continuations is not None:
            raise RequestError(
                "loglikelihood.scope",
                "loglikelihood.scope 'rolling' scores the whole prompt; it cannot be combined "
                "with loglikelihood.continuations",
            )
        k = top_logprobs_of(options, request.logprobs, "logprobs")
        prompts = completion_prompts(request.prompt)
        groups: list[list[Job]] = []
        for p, prompt in enumerate(prompts):
            groups.append(completion_jobs(scoring.scorer, prompt, p, len(prompts), options))
    except RequestError as e:
        return error_response(str(e), e.param, HTTPStatus.BAD_REQUEST)

    jobs = [job for group in groups for job in group]
    generate = request.max_tokens != 0 or bool(request.echo)
    if generate and any(p == "" for p in prompts):
        return error_response(
            "prompt must not be empty when generating; an empty context is only for scoring "
            "continuations with max_tokens: 0",
            "prompt",
            HTTPStatus.BAD_REQUEST,
        )
    handler = raw_request.app.state.openai_serving_completion
    scores, generated = await asyncio.gather(
        scoring.run(jobs, k, options.content),
        handler.create_completion(request, raw_request) if generate else no_generation(),
    )
    per_prompt, at = [], 0
    for group in groups:
        per_prompt.append(as_entries(scores[at : at + len(group)], options.content))
        at += len(group)
    prompt_tokens = scored_prompt_tokens(jobs)
    if generated is not None:
        return merge(generated, per_prompt, request.n, prompt_tokens)
    return completion_response(request, raw_request, per_prompt, prompt_tokens)



def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request, as a list (vLLM's four accepted shapes)."""
    if prompt is None or prompt == []:
        raise RequestError("prompt", "prompt is required with loglikelihood")
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def completion_jobs(
    scorer: Scorer, prompt: str | list[int], p: int, count: int, options: LoglikelihoodOptions
) -> list[Job]:
    where = f"prompt[{p}]" if count > 1 else "prompt"
    if isinstance(prompt, str):
        # Checked here, so that a context that cannot be encoded is not reported against the
        # continuation it was paired with.
        try:
            check_text(prompt, where)
        except ValueError as e:
            raise RequestError(where, str(e)) from None
    try:
        if options.scope == "rolling":
            return [scorer.rolling(prompt)]
        if options.continuations is None:
            return [scorer.prompt(prompt)]
        jobs = []
        for i, continuation in enumerate(options.continuations):
            field = f"loglikelihood.continuations[{i}]"
            try:
                if isinstance(prompt, str):
                    jobs.append(scorer.pair(prompt, continuation))
                else:
                    jobs.append(scorer.pair_ids(prompt, continuation))
            except ValueError as e:
                raise RequestError(field, f"{where} with {field}: {e}") from None
        return jobs
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(where, f"{where}: {e}") from None

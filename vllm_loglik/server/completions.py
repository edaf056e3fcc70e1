"""`POST /v1/completions` with `loglikelihood`: the prompt, or continuations of it."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from fastapi import Request

from ..jobs import Job
from ..requests import RequestError, completion_jobs, completion_prompts
from .protocol import ErrorResponse, LoglikelihoodCompletionRequest, error_json, error_response
from .responses import (
    as_entries,
    completion_response,
    merge,
    no_generation,
    scored_prompt_tokens,
)
from .validation import adapter_of, checked, top_logprobs_of


async def score_completion(request: LoglikelihoodCompletionRequest, raw_request: Request):
    try:
        scoring, options = checked(request, raw_request)
        k = top_logprobs_of(scoring, options, request.logprobs, "logprobs")
        prompts = completion_prompts(request.prompt)
        groups: list[list[Job]] = []
        for p, prompt in enumerate(prompts):
            groups.append(completion_jobs(scoring.scorer, prompt, p, len(prompts), options))
        scoring.limits.check_jobs([job for g in groups for job in g], options.scope == "rolling")
    except RequestError as e:
        return error_response(str(e), e.param, getattr(e, "status", HTTPStatus.BAD_REQUEST))

    handler = raw_request.app.state.openai_serving_completion
    adapter = await adapter_of(request, handler)
    if isinstance(adapter, ErrorResponse):
        return error_json(adapter)
    jobs = [job for group in groups for job in group]
    generate = request.max_tokens != 0 or bool(request.echo)
    if generate and any(p == "" for p in prompts):
        return error_response(
            "prompt must not be empty when generating; an empty context is only for scoring "
            "continuations with max_tokens: 0",
            "prompt",
            HTTPStatus.BAD_REQUEST,
        )
    scores, generated = await asyncio.gather(
        scoring.run(jobs, k, options.content, adapter),
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

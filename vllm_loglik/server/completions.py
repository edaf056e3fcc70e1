"""`POST /v1/completions` with `loglikelihood`: the prompt, or continuations of it."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from fastapi import Request

from ..requests import RequestError, completion_prompts, translate_completion
from .protocol import ErrorResponse, LoglikelihoodCompletionRequest, error_json, error_response
from .responses import (
    as_entries,
    completion_response,
    merge,
    no_generation,
    scored_prompt_tokens,
)
from .validation import adapter_of, check_translation, scoring_of


async def score_completion(request: LoglikelihoodCompletionRequest, raw_request: Request):
    try:
        scoring, options = scoring_of(request, raw_request)
        work = translate_completion(
            scoring.scorer, options, request.prompt, request.logprobs,
            scoring.limits.max_continuations,
        )  # fmt: skip
        check_translation(scoring, work)
    except RequestError as e:
        return error_response(str(e), e.param, getattr(e, "status", HTTPStatus.BAD_REQUEST))

    handler = raw_request.app.state.openai_serving_completion
    adapter = await adapter_of(request, handler)
    if isinstance(adapter, ErrorResponse):
        return error_json(adapter)
    groups, jobs = work.groups, work.jobs
    generate = request.max_tokens != 0 or bool(request.echo)
    if generate and any(p == "" for p in completion_prompts(request.prompt)):
        return error_response(
            "prompt must not be empty when generating; an empty context is only for scoring "
            "continuations with max_tokens: 0",
            "prompt",
            HTTPStatus.BAD_REQUEST,
        )
    scores, generated = await asyncio.gather(
        scoring.run(
            jobs, work.top_logprobs, work.content, adapter, work.corrected_words, work.temperature
        ),
        handler.create_completion(request, raw_request) if generate else no_generation(),
    )
    per_prompt, at = [], 0
    for group in groups:
        per_prompt.append(as_entries(scores[at : at + len(group)], work.content))
        at += len(group)
    prompt_tokens = scored_prompt_tokens(jobs)
    if generated is not None:
        return merge(generated, per_prompt, request.n, prompt_tokens)
    return completion_response(request, raw_request, per_prompt, prompt_tokens)

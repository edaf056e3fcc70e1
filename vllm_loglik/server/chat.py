"""`POST /v1/chat/completions` with `loglikelihood`: the rendered prompt, the last message, or
candidate final assistant messages, under the server's chat template."""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from fastapi import Request

from ..requests import RequestError, translate_chat
from .protocol import ErrorResponse, LoglikelihoodChatCompletionRequest, error_json, error_response
from .responses import as_entries, chat_response, merge, no_generation, scored_prompt_tokens
from .validation import adapter_of, check_translation, scoring_of


async def score_chat(request: LoglikelihoodChatCompletionRequest, raw_request: Request):
    try:
        scoring, options = scoring_of(request, raw_request)
        work = translate_chat(
            scoring.scorer, options, request.messages,
            request.top_logprobs if request.logprobs else 0, scoring.limits.max_continuations,
            chat_template_kwargs=request.chat_template_kwargs,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
        )  # fmt: skip
        check_translation(scoring, work)
    except RequestError as e:
        return error_response(str(e), e.param, getattr(e, "status", HTTPStatus.BAD_REQUEST))

    max_tokens = (
        request.max_completion_tokens
        if request.max_completion_tokens is not None
        else request.max_tokens
    )
    handler = raw_request.app.state.openai_serving_chat
    adapter = await adapter_of(request, handler)
    if isinstance(adapter, ErrorResponse):
        return error_json(adapter)
    jobs = work.jobs
    scores, generated = await asyncio.gather(
        scoring.run(
            jobs, work.top_logprobs, work.content, adapter, work.corrected_words, work.temperature
        ),
        handler.create_chat_completion(request, raw_request) if max_tokens != 0 else no_generation(),
    )
    entries = as_entries(scores, work.content)
    prompt_tokens = scored_prompt_tokens(jobs)
    n = request.n or 1
    if generated is not None:
        return merge(generated, [entries], n, prompt_tokens)
    return chat_response(request, raw_request, entries, n, prompt_tokens)

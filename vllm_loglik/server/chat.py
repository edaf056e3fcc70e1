"""`POST /v1/chat/completions` with `loglikelihood`: the rendered prompt, the last message, or
candidate final assistant messages, under the server's chat template."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from fastapi import Request

from ..spans import check_text
from .protocol import LoglikelihoodChatCompletionRequest, RequestError, error_response
from .responses import as_entries, chat_response, merge, no_generation, scored_prompt_tokens
from .validation import checked, top_logprobs_of


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """The request's messages with text content, as the chat template takes them."""
    out = []
    for i, message in enumerate(messages or []):
        message = dict(message)
        content = message.get("content")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            parts = []
            for part in content:
                part = dict(part)
                if part.get("type") != "text":
                    raise RequestError(
                        f"messages[{i}].content",
                        f"messages[{i}].content: only text parts can be scored with loglikelihood",
                    )
                parts.append(part.get("text", ""))
            content = "\n".join(parts)
        try:
            check_text(content, f"messages[{i}].content")
        except ValueError as e:
            raise RequestError(f"messages[{i}].content", str(e)) from None
        message["content"] = content
        out.append(message)
    return out


async def score_chat(request: LoglikelihoodChatCompletionRequest, raw_request: Request):
    try:
        scoring, options = checked(request, raw_request)
        k = top_logprobs_of(options, request.top_logprobs if request.logprobs else 0, "top_logprobs")
        if options.scope == "rolling":
            raise RequestError(
                "loglikelihood.scope",
                "loglikelihood.scope 'rolling' is only for /v1/completions; chat scores the "
                "rendered prompt, the last message or candidate messages",
            )
        messages = chat_messages(request.messages)
        kwargs = dict(request.chat_template_kwargs or {})
        if request.continue_final_message:
            kwargs["continue_final_message"] = True
        try:
            if options.continuations is not None:
                jobs = []
                for i, text in enumerate(options.continuations):
                    try:
                        jobs.append(scoring.scorer.chat(messages, text, kwargs))
                    except ValueError as e:
                        field = f"loglikelihood.continuations[{i}]"
                        raise RequestError(field, f"{field}: {e}") from None
            elif options.scope == "last_message":
                jobs = [scoring.scorer.chat(messages, None, kwargs)]
            else:
                jobs = [
                    scoring.scorer.chat_prompt(
                        messages, request.add_generation_prompt and not request.continue_final_message, kwargs
                    )
                ]
        except RequestError:
            raise
        except ValueError as e:
            raise RequestError("messages", f"messages: {e}") from None
    except RequestError as e:
        return error_response(str(e), e.param, HTTPStatus.BAD_REQUEST)

    max_tokens = (
        request.max_completion_tokens
        if request.max_completion_tokens is not None
        else request.max_tokens
    )
    handler = raw_request.app.state.openai_serving_chat
    scores, generated = await asyncio.gather(
        scoring.run(jobs, k, options.content),
        handler.create_chat_completion(request, raw_request) if max_tokens != 0 else no_generation(),
    )
    entries = as_entries(scores, options.content)
    prompt_tokens = scored_prompt_tokens(jobs)
    n = request.n or 1
    if generated is not None:
        return merge(generated, [entries], n, prompt_tokens)
    return chat_response(request, raw_request, entries, n, prompt_tokens)

"""The `vllm serve` plugin: a `loglikelihood` field on `/v1/completions` and `/v1/chat/completions`.

This is the only module that touches vLLM's server. It uses one public extension point:
an entry point in the `vllm.endpoint_plugins` group (`vllm/plugins/endpoint_plugins/interface.py`),
loaded only when named in `VLLM_PLUGINS`::

    VLLM_PLUGINS=loglikelihood vllm serve MODEL

`attach_router` replaces the two POST routes with routes whose request models are vLLM's own
plus the `loglikelihood` field (so `/openapi.json` documents it). A request without the field,
or with `loglikelihood: false`, is handed to the original route's endpoint unchanged: streaming,
tools, errors and generation behave as without the plugin. The routes keep the original routes'
dependencies; `--api-key` is enforced by vLLM's middleware, which guards every `/v1` path.

A request with the field is validated first (HTTP 400 in the OpenAI error shape, naming the
field), then scored through vLLM's prompt-logprobs path: one engine request per span, with
`SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)`, sent through the
`EngineClient` that the plugin receives in `init_state`, the same way the serving handlers do.
Prompt-logprob requests never read the prefix cache (vLLM's default, kept), which avoids the
engine crash of prompt logprobs on cached prefixes. When `max_tokens` is not 0, the original
handler generates as usual, concurrently, and the entries are merged into its choices.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from argparse import Namespace
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, field_validator, model_validator
from starlette.datastructures import State

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from .jobs import Job, Scorer
from .protocol import (
    DEFAULT_MAX_CONTINUATIONS,
    LOGLIKELIHOOD_DESCRIPTION,
    LoglikelihoodOptions,
    entry_from_score,
    parse_loglikelihood,
)
from .scoring import Score
from .spans import Span

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


class _WithLoglikelihood(BaseModel):
    loglikelihood: bool | LoglikelihoodOptions | None = Field(
        default=None, description=LOGLIKELIHOOD_DESCRIPTION
    )

    @field_validator("loglikelihood", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        return parse_loglikelihood(value)


class LoglikelihoodCompletionRequest(CompletionRequest, _WithLoglikelihood):
    """vLLM's completions request plus the `loglikelihood` field."""

    @model_validator(mode="before")
    @classmethod
    def validate_prompt_and_prompt_embeds(cls, data: Any) -> Any:
        # Replaces vLLM's check of the same name, for one case: an empty prompt is the empty
        # context of lm-eval's loglikelihood when continuations are scored after it.
        if (
            isinstance(data, dict)
            and data.get("prompt") == ""
            and isinstance(data.get("loglikelihood"), dict)
            and data["loglikelihood"].get("continuations")
        ):
            return data
        return CompletionRequest.validate_prompt_and_prompt_embeds(data)


class LoglikelihoodChatCompletionRequest(ChatCompletionRequest, _WithLoglikelihood):
    """vLLM's chat completions request plus the `loglikelihood` field."""


class RequestError(ValueError):
    """Bad input: becomes HTTP 400 with `param` naming the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def error_response(message: str, param: str | None, status: HTTPStatus) -> JSONResponse:
    # The shape of vLLM's (and OpenAI's) ErrorResponse.
    body = {
        "error": {
            "message": message,
            "type": "BadRequestError" if status == HTTPStatus.BAD_REQUEST else status.phrase,
            "param": param,
            "code": status.value,
        }
    }
    return JSONResponse(body, status_code=status.value)


class ServerScoring:
    """Per-app state: the scorer, and the engine that computes prompt logprobs.

    Shared contexts are computed once. When the engine has prefix caching on, a request whose
    spans share a prefix of at least one KV block (the context of several continuations, or
    of one continuation: a client may send the same context again with the next one) first
    prefills that
    prefix as a plain request (no logprobs), which stores its full blocks in the prefix cache.
    The spans are then scored with `skip_reading_prefix_cache=False`, so the engine computes
    only the uncached tail. This is safe only with `detokenize=False`: vLLM leaves the cached
    positions' prompt logprobs unset, and detokenizing them kills the engine. The warm-up
    prefix stops one token before the first scored position, so the logits that predict the
    first scored token are always computed; and a span whose cache hit reaches a scored
    position anyway (`num_cached_tokens`) is scored again without the cache.
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
        return final

    async def run(self, jobs: list[Job], top_logprobs: int) -> list[Score]:
        """Score `jobs`: every span is its own engine request, all in flight at once."""
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
                skip_reading_prefix_cache=not read_cache,
            )

        async def one(i: int, span: Span):
            out = await self._generate(span.prompt_token_ids, params(prefix is not None), f"loglik-{base}-{i}")
            if prefix is not None and (out.num_cached_tokens or 0) > span.start - 1:
                out = await self._generate(span.prompt_token_ids, params(False), f"loglik-{base}-{i}-full")
            return out.prompt_logprobs

        tasks = [asyncio.ensure_future(one(i, s)) for i, s in enumerate(spans)]
        try:
            logprobs = iter(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return [
            self.scorer.finish(job, [next(logprobs) for _ in job.spans], top_logprobs)
            for job in jobs
        ]


def options_of(request: Any) -> LoglikelihoodOptions:
    value = request.loglikelihood
    return value if isinstance(value, LoglikelihoodOptions) else LoglikelihoodOptions()


def check_common(request: Any, options: LoglikelihoodOptions, scoring: ServerScoring) -> None:
    if request.stream:
        raise RequestError(
            "stream",
            "loglikelihood cannot be combined with stream: true; send the request without "
            "streaming",
        )
    continuations = options.continuations
    if continuations is not None:
        if not continuations:
            raise RequestError("loglikelihood.continuations", "loglikelihood.continuations must not be empty")
        if len(continuations) > scoring.max_continuations:
            raise RequestError(
                "loglikelihood.continuations",
                f"loglikelihood.continuations has {len(continuations)} items; at most "
                f"{scoring.max_continuations} are allowed (VLLM_LOGLIK_MAX_CONTINUATIONS)",
            )
        for i, text in enumerate(continuations):
            if text == "":
                raise RequestError(
                    f"loglikelihood.continuations[{i}]",
                    f"loglikelihood.continuations[{i}] must not be an empty string",
                )


def top_logprobs_of(options: LoglikelihoodOptions, fallback: int | None, name: str) -> int:
    if options.top_logprobs is not None:
        return options.top_logprobs
    k = fallback or 0
    if k > 20:
        raise RequestError(
            name, f"{name} is {k}; loglikelihood entries allow at most 20 top_logprobs"
        )
    return max(k, 0)


def check_model(request: Any, raw_request: Request) -> None:
    models = getattr(raw_request.app.state, "openai_serving_models", None)
    if request.model and models is not None and not models.is_base_model(request.model):
        raise RequestError(
            "model",
            f"loglikelihood is computed with the base model only; model {request.model!r} "
            "is not the served base model",
        )


def model_name(request: Any, raw_request: Request) -> str:
    models = getattr(raw_request.app.state, "openai_serving_models", None)
    return request.model or (models.model_name() if models is not None else "")


def scored_prompt_tokens(jobs: Sequence[Job]) -> int:
    return sum(len(span.prompt_token_ids) for job in jobs for span in job.spans)


def as_entries(scores: Sequence[Score]) -> list[dict[str, Any]]:
    return [entry_from_score(i, s) for i, s in enumerate(scores)]


def merge(
    response: Any, per_prompt: list[list[dict[str, Any]]], n: int, prompt_tokens: int
) -> JSONResponse:
    """Add the entries to each choice of the original handler's response; an `ErrorResponse`
    from the handler is returned as it is, with its status."""
    if not hasattr(response, "choices"):
        return JSONResponse(response.model_dump(), status_code=response.error.code)
    body = response.model_dump()
    for choice in body["choices"]:
        choice["loglikelihood"] = per_prompt[choice["index"] // n]
    usage = body.get("usage") or {}
    usage["prompt_tokens"] = prompt_tokens
    usage["total_tokens"] = prompt_tokens + (usage.get("completion_tokens") or 0)
    body["usage"] = usage
    return JSONResponse(body)


def usage(prompt_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}


async def score_completion(request: LoglikelihoodCompletionRequest, raw_request: Request):
    scoring: ServerScoring = raw_request.app.state.vllm_loglik
    options = options_of(request)
    try:
        check_common(request, options, scoring)
        check_model(request, raw_request)
        if options.scope != "prompt":
            raise RequestError(
                "loglikelihood.scope",
                "loglikelihood.scope 'last_message' is only for /v1/chat/completions; "
                "completions score the prompt or continuations",
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
        scoring.run(jobs, k),
        handler.create_completion(request, raw_request) if generate else _none(),
    )
    per_prompt, at = [], 0
    for group in groups:
        per_prompt.append(as_entries(scores[at : at + len(group)]))
        at += len(group)
    prompt_tokens = scored_prompt_tokens(jobs)
    if generated is not None:
        return merge(generated, per_prompt, request.n, prompt_tokens)
    choices = [
        {
            "index": p * request.n + j,
            "text": "",
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "loglikelihood": entries,
        }
        for p, entries in enumerate(per_prompt)
        for j in range(request.n)
    ]
    return JSONResponse(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name(request, raw_request),
            "choices": choices,
            "usage": usage(prompt_tokens),
        }
    )


async def _none() -> None:
    return None


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
    try:
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
        message["content"] = content
        out.append(message)
    return out


async def score_chat(request: LoglikelihoodChatCompletionRequest, raw_request: Request):
    scoring: ServerScoring = raw_request.app.state.vllm_loglik
    options = options_of(request)
    try:
        check_common(request, options, scoring)
        check_model(request, raw_request)
        k = top_logprobs_of(options, request.top_logprobs if request.logprobs else 0, "top_logprobs")
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
        scoring.run(jobs, k),
        handler.create_chat_completion(request, raw_request) if max_tokens != 0 else _none(),
    )
    entries = as_entries(scores)
    prompt_tokens = scored_prompt_tokens(jobs)
    n = request.n or 1
    if generated is not None:
        return merge(generated, [entries], n, prompt_tokens)
    return JSONResponse(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name(request, raw_request),
            "choices": [
                {
                    "index": j,
                    "message": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "loglikelihood": entries,
                }
                for j in range(n)
            ],
            "usage": usage(prompt_tokens),
        }
    )


def _route(app: FastAPI, path: str) -> APIRoute | None:
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods:
            return route
    return None


def _wrap(original: APIRoute, request_model: type, scorer_fn):
    original_endpoint = original.endpoint
    scored = with_cancellation(scorer_fn)

    async def endpoint(request: Any, raw_request: Request):
        if not request.loglikelihood:
            return await original_endpoint(request, raw_request)
        return await scored(request, raw_request)

    # FastAPI reads the body model from the annotation.
    endpoint.__annotations__ = {"request": request_model, "raw_request": Request}
    endpoint.__name__ = original_endpoint.__name__
    endpoint.__doc__ = original_endpoint.__doc__
    return endpoint


class LoglikelihoodPlugin:
    """The `vllm.endpoint_plugins` entry point (see `vllm.plugins.endpoint_plugins.interface`)."""

    name = "loglikelihood"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()
        for path, model, fn in (
            (COMPLETIONS, LoglikelihoodCompletionRequest, score_completion),
            (CHAT, LoglikelihoodChatCompletionRequest, score_chat),
        ):
            original = _route(app, path)
            if original is None:
                continue
            router.add_api_route(
                path,
                _wrap(original, model, fn),
                methods=["POST"],
                dependencies=list(original.dependencies),
                responses=dict(original.responses),
                summary=original.summary,
                tags=list(original.tags or []),
            )
        app.include_router(router)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        # No engine (the CPU-only render server): the routes then behave as the originals,
        # and a loglikelihood request gets an error from the missing state.
        state.vllm_loglik = ServerScoring(engine_client, state) if engine_client else None

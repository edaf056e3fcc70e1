"""Checks that both endpoints apply to a request with `loglikelihood`, before any engine work.

Each raises `RequestError` naming the field, which the handlers answer with HTTP 400.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import Request

from ..protocol import LoglikelihoodOptions
from .engine import ServerScoring
from ..requests import RequestError, check_continuations


def checked(request: Any, raw_request: Request) -> tuple[ServerScoring, LoglikelihoodOptions]:
    """The app's `ServerScoring` and the request's options, after the checks of both endpoints."""
    scoring: ServerScoring = raw_request.app.state.vllm_loglik
    if scoring.lora_problem is not None:
        raise NotScorable(scoring.lora_problem)
    options = options_of(request)
    check_common(request, options, scoring)
    return scoring, options


class NotScorable(RequestError):
    """The server's configuration cannot score (HTTP 501): LoRA on the output layer."""

    status = HTTPStatus.NOT_IMPLEMENTED

    def __init__(self, message: str):
        super().__init__(None, message)  # type: ignore[arg-type]  # no field is at fault


def options_of(request: Any) -> LoglikelihoodOptions:
    """The field's options; `true` is the object with every default."""
    value = request.loglikelihood
    return value if isinstance(value, LoglikelihoodOptions) else LoglikelihoodOptions()


def check_common(request: Any, options: LoglikelihoodOptions, scoring: ServerScoring) -> None:
    if request.stream:
        raise RequestError(
            "stream",
            "loglikelihood cannot be combined with stream: true; send the request without "
            "streaming",
        )
    check_continuations(options, scoring.limits.max_continuations)
    scoring.limits.check_request(request)


def top_logprobs_of(
    scoring: ServerScoring, options: LoglikelihoodOptions, fallback: int | None, name: str
) -> int:
    """The alternatives per token: the field's own `top_logprobs`, else the request's `name`
    (which the compact response ignores: it lists no tokens)."""
    if options.top_logprobs is not None:
        scoring.limits.check_top_logprobs(options.top_logprobs, "loglikelihood.top_logprobs")
        if options.top_logprobs and not options.content:
            raise RequestError(
                "loglikelihood.top_logprobs",
                "loglikelihood.top_logprobs needs loglikelihood.content: true; the compact "
                "response (content: false) lists no tokens",
            )
        return options.top_logprobs
    if not options.content:
        return 0
    k = fallback or 0
    scoring.limits.check_top_logprobs(k, name)
    return max(k, 0)


async def adapter_of(request: Any, serving: Any) -> Any:
    """The LoRA adapter that `request.model` names (None for the base model), or vLLM's own
    `ErrorResponse` for a name that it does not serve. `serving` is the endpoint's vLLM
    handler (`openai_serving_completion` or `openai_serving_chat`), which resolves the name
    exactly as it does for generation: `_check_model` answers an unknown name with its 404
    (`NotFoundError`, `param: model`) and loads an adapter at run time where
    `VLLM_ALLOW_RUNTIME_LORA_UPDATING` allows it; `_maybe_get_adapters` gives the adapter's
    `LoRARequest`. vLLM exposes no public call for this, and its handlers use these two."""
    error = await serving._check_model(request)
    if error is not None:
        return error
    return serving._maybe_get_adapters(request)

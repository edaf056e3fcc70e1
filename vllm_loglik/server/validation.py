"""Checks that both endpoints apply to a request with `loglikelihood`, before any engine work.

Each raises `RequestError` naming the field, which the handlers answer with HTTP 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..protocol import LoglikelihoodOptions
from ..spans import excerpt
from .engine import ServerScoring
from ..requests import RequestError, check_continuations


def checked(request: Any, raw_request: Request) -> tuple[ServerScoring, LoglikelihoodOptions]:
    """The app's `ServerScoring` and the request's options, after the checks of both endpoints."""
    scoring: ServerScoring = raw_request.app.state.vllm_loglik
    options = options_of(request)
    check_common(request, options, scoring)
    check_model(request, raw_request)
    return scoring, options


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


def check_model(request: Any, raw_request: Request) -> None:
    models = getattr(raw_request.app.state, "openai_serving_models", None)
    if request.model and models is not None and not models.is_base_model(request.model):
        raise RequestError(
            "model",
            f"loglikelihood is computed with the base model only; model {excerpt(request.model)} "
            "is not the served base model",
        )

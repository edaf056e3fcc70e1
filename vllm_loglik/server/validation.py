"""The server's checks of a request with `loglikelihood`, before any engine work.

A request goes one way: `scoring_of` (the configuration, and the fields checked before any
tokenizing), then the one translation of its body into jobs (`vllm_loglik.requests`,
`translate_completion` or `translate_chat`, which the batch CLI runs too), then
`check_translation` (the server's caps, and what its engine can compute). Each raises
`RequestError` naming the field, which the handlers answer with HTTP 400.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import Request

from ..protocol import LoglikelihoodOptions
from .engine import ServerScoring
from ..requests import RequestError, Translation


def scoring_of(request: Any, raw_request: Request) -> tuple[ServerScoring, LoglikelihoodOptions]:
    """The app's `ServerScoring` and the request's options, after the checks of the request's
    own fields that come before any tokenizing (the configuration, `stream`, `n`)."""
    scoring: ServerScoring = raw_request.app.state.vllm_loglik
    if scoring.lora_problem is not None:
        raise NotScorable(scoring.lora_problem)
    options = options_of(request)
    if request.stream:
        raise RequestError(
            "stream",
            "loglikelihood cannot be combined with stream: true; send the request without "
            "streaming",
        )
    scoring.limits.check_request(request)
    return scoring, options


def check_translation(scoring: ServerScoring, work: Translation) -> None:
    """The server's own checks of a translated request: its caps, and what this engine can
    compute (corrected word probabilities need the engine's word masses, and on V1 two more
    prompt logprobs per position than the alternatives asked for)."""
    scoring.limits.check_top_logprobs(work.top_logprobs, work.top_logprobs_field, scoring.max_logprobs)
    scoring.limits.check_jobs(work.jobs, work.rolling)
    refusal = scoring.runner.temperature_refusal(work.temperature, "loglikelihood.temperature")
    if refusal is not None:
        raise RequestError("loglikelihood.temperature", refusal)
    if not work.corrected_words:
        return
    if scoring.words_problem is not None:
        raise RequestError("loglikelihood.word_probability", scoring.words_problem)
    refusal = scoring.runner.words_refusal(
        work.top_logprobs, scoring.max_logprobs, work.top_logprobs_field
    )
    if refusal is not None:
        raise RequestError(work.top_logprobs_field, refusal)


class NotScorable(RequestError):
    """The server's configuration cannot score (HTTP 501): LoRA on the output layer."""

    status = HTTPStatus.NOT_IMPLEMENTED

    def __init__(self, message: str):
        super().__init__(None, message)  # type: ignore[arg-type]  # no field is at fault


def options_of(request: Any) -> LoglikelihoodOptions:
    """The field's options; `true` is the object with every default."""
    value = request.loglikelihood
    return value if isinstance(value, LoglikelihoodOptions) else LoglikelihoodOptions()


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

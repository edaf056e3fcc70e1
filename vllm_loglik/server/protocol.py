"""The server's request models: vLLM's own completions and chat requests plus `loglikelihood`.

The field's value (`true` or a `LoglikelihoodOptions` object) is defined in
`vllm_loglik.protocol`, which clients import without vLLM; this module binds it to vLLM's
request classes, so that FastAPI validates it and `/openapi.json` documents it. Bad input is
reported as a `RequestError`, which the handlers turn into HTTP 400 in the OpenAI error shape; a
fault of the server is HTTP 500 in the same shape (`internal_error_response`).
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator, model_validator

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from ..protocol import LOGLIKELIHOOD_DESCRIPTION, LoglikelihoodOptions, parse_loglikelihood
from ..requests import RequestError  # noqa: F401  (re-exported: bad input, a 400)

logger = logging.getLogger("vllm.loglik.server")


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


def error_response(message: str, param: str | None, status: HTTPStatus) -> JSONResponse:
    """An error in the shape of vLLM's (and OpenAI's) `ErrorResponse`."""
    kind = {
        HTTPStatus.BAD_REQUEST: "BadRequestError",
        HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "RequestTooLargeError",
        HTTPStatus.NOT_IMPLEMENTED: "NotImplementedError",
    }
    body = {
        "error": {
            "message": message,
            "type": kind.get(status, status.phrase),
            "param": param,
            "code": status.value,
        }
    }
    return JSONResponse(body, status_code=status.value)


def error_json(error: ErrorResponse) -> JSONResponse:
    """vLLM's own `ErrorResponse` (from one of its handlers), as vLLM's routes send it."""
    return JSONResponse(error.model_dump(), status_code=error.error.code)


def internal_error_response(exc: BaseException) -> JSONResponse:
    """HTTP 500 for a fault in computing the scores (`ScoringFault`), never blamed on the client.

    The body says only that scoring failed and gives an id to look up; the exception, with its
    traceback, goes to the server log under that id.
    """
    error_id = f"loglik-error-{uuid.uuid4().hex[:16]}"
    logger.error("loglikelihood request failed (%s)", error_id, exc_info=exc)
    return error_response(
        f"internal error while computing loglikelihood (error id {error_id}); the server log "
        "has the details",
        None,
        HTTPStatus.INTERNAL_SERVER_ERROR,
    )

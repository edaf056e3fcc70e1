"""`POST /get_sequence_logprobs/`: TRL's teacher request on stock `vllm serve`.

`trl vllm-serve` answers this route for TRL's trainers (on-policy distillation, self-distillation,
trainers with a KL term); TRL's maintainers are retiring that server. With the plugin on, `vllm
serve` answers the same request in the same two formats (`vllm_loglik.teacher`), so a trainer
or a client written for `trl vllm-serve` works unchanged. Where it differs:

* `temperature` is honoured: the logprobs are log softmax(logits / T). `trl vllm-serve` passes T
  to vLLM, whose prompt logprobs ignore it (raw logprobs whatever T is).
* The sequences that share a prompt are scored as continuations of one context, computed once
  where prefix caching is on; `trl vllm-serve` computes every sequence whole.
* Bad input is HTTP 400 in the OpenAI error shape, naming the field (`trl vllm-serve` answers a
  bare 500): lengths that disagree, a prompt length out of range, a sequence too long for the
  context, a token id outside the vocabulary, `top_logprobs` over the server's `--max-logprobs`,
  an unknown field. Nothing reaches the engine before every sequence is checked.
* An optional `model` names a served LoRA adapter (default: the base model), resolved as
  `/v1/completions` resolves it.
* A long answer is gzipped where the client accepts it (`Accept-Encoding`; TRL's client does).
* The route is guarded by `--api-key` when the server has one (vLLM's own middleware guards
  only `/v1`): it checks the bearer token with vLLM's `AuthenticationMiddleware.verify_token`.
  TRL's client sends no key; run its teacher server without one, on a private network.
"""

from __future__ import annotations

import asyncio
import json
import time
from http import HTTPStatus
from typing import Any, Literal

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from ..requests import RequestError
from ..spans import excerpt
from ..teacher import (
    TRL_TOP_LOGPROBS,
    SequenceLogprobs,
    binary_body,
    check_temperature,
    json_body,
    sequence_spans,
)
from .engine import ScoringFault, ServerScoring
from .limits import TooLarge
from .metrics import metrics, model_label
from .protocol import ErrorResponse, error_json, error_response, internal_error_response
from .validation import adapter_of

PATH = "/get_sequence_logprobs/"


class SequenceLogprobsRequest(BaseModel):
    """`trl vllm-serve`'s request, plus `model`. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    sequences: list[list[StrictInt]] = Field(
        description="Full token sequences, prompt then completion."
    )
    prompt_lengths: list[StrictInt] = Field(
        description="Prompt tokens of each sequence; its completion region starts there."
    )
    top_logprobs: StrictInt = Field(
        default=TRL_TOP_LOGPROBS,
        description="Top logprobs per completion position, best first: 0 to the server's "
        "--max-logprobs (vLLM's default: 20).",
    )
    temperature: float = Field(
        default=1.0, description="The teacher distribution's temperature: log softmax(logits / T)."
    )
    response_format: Literal["json", "binary"] = Field(
        default="json",
        description="`json`: nested lists; `binary`: base64 float32/int32 arrays with `shape`.",
    )
    model: str | None = Field(
        default=None, description="A served LoRA adapter's name; default: the base model."
    )


def parse(body: bytes) -> SequenceLogprobsRequest:
    """The request from its JSON body; a `RequestError` names the field at fault."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RequestError(None, "the body must be a JSON object in UTF-8") from None
    if not isinstance(data, dict):
        raise RequestError(None, "the body must be a JSON object")
    try:
        return SequenceLogprobsRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else None
        where = loc[0] + "".join(f"[{p}]" for p in loc[1:]) if loc else "the body"
        if err["type"] == "extra_forbidden":
            raise RequestError(
                field,
                f"{excerpt(field, 40)} is not a field of this request (known: "
                f"{', '.join(SequenceLogprobsRequest.model_fields)})",
            ) from None
        if err["type"] == "missing":
            raise RequestError(field, f"{where} is required") from None
        raise RequestError(field, f"{where}: {err['msg']}") from None


def check(request: SequenceLogprobsRequest, scoring: ServerScoring) -> tuple[list[Any], float]:
    """The spans of the request's sequences and its temperature, after every check that needs
    the server: its cap on top logprobs, whether it can honour the temperature, the sequences
    against its vocabulary and context, and the cap on a request's tokens."""
    k = request.top_logprobs
    if not 0 <= k <= scoring.max_logprobs:
        raise RequestError(
            "top_logprobs",
            f"top_logprobs is {k}; this server allows 0 to {scoring.max_logprobs} "
            "(its --max-logprobs; start it with a larger one for more)",
        )
    try:
        temperature = check_temperature(request.temperature)
    except ValueError as e:
        raise RequestError("temperature", str(e)) from None
    refusal = scoring.runner.temperature_refusal(temperature)
    if refusal is not None:
        raise RequestError("temperature", refusal)
    scorer = scoring.scorer
    try:
        spans = sequence_spans(
            request.sequences, request.prompt_lengths, scorer.tokens.check_ids,
            scorer.max_prompt_len, scorer.max_model_len,
        )  # fmt: skip
    except ValueError as e:
        message = str(e)
        field = "prompt_lengths" if message.startswith("prompt_lengths") else "sequences"
        raise RequestError(field, message) from None
    tokens = sum(len(s) for s in request.sequences)
    if tokens > scoring.limits.max_scored_tokens:
        raise TooLarge(
            "sequences",
            f"the request holds {tokens:,} tokens; at most {scoring.limits.max_scored_tokens:,} "
            "per request (VLLM_LOGLIK_MAX_SCORED_TOKENS): split it (TRL's client: chunk_size)",
        )
    return spans, temperature


async def sequence_logprobs(request: SequenceLogprobsRequest, raw_request: Request) -> Any:
    """Score the request's completion regions and answer in its `response_format`."""
    scoring: ServerScoring | None = getattr(raw_request.app.state, "vllm_loglik", None)
    if scoring is None:
        return error_response("this server has no engine", None, HTTPStatus.NOT_IMPLEMENTED)
    if scoring.lora_problem is not None:
        return error_response(scoring.lora_problem, None, HTTPStatus.NOT_IMPLEMENTED)
    try:
        spans, temperature = check(request, scoring)
    except RequestError as e:
        return error_response(str(e), e.param, getattr(e, "status", HTTPStatus.BAD_REQUEST))
    adapter = None
    if request.model is not None:
        adapter = await adapter_of(request, raw_request.app.state.openai_serving_completion)
        if isinstance(adapter, ErrorResponse):
            return error_json(adapter)
    scored = [s for s in spans if s is not None]
    rows = iter(await scoring.rows(scored, request.top_logprobs, adapter, temperature))
    per_sequence = [next(rows) if s is not None else None for s in spans]
    accepts_gzip = "gzip" in raw_request.headers.get("accept-encoding", "").lower()
    # Tens of MB for a large batch: laid out, encoded and compressed off the event loop.
    return await asyncio.to_thread(answer, request, spans, per_sequence, accepts_gzip)


def answer(
    request: SequenceLogprobsRequest, spans: list[Any], rows: list[Any], accepts_gzip: bool
) -> Response:
    """The response: the arrays, in the request's `response_format`, gzipped where it pays."""
    result = SequenceLogprobs.from_rows(
        request.sequences, request.prompt_lengths, spans, rows, request.top_logprobs
    )
    body = binary_body(result) if request.response_format == "binary" else json_body(result)
    return compressed(msgspec.json.encode(body), accepts_gzip)


#: Answers shorter than this are sent as they are.
GZIP_MIN_BYTES = 1 << 16


def compressed(data: bytes, accepts_gzip: bool) -> Response:
    """The answer, gzipped at level 1 (the fastest) where the client accepts it and it is
    long: TRL's client (`requests`) and httpx ask for gzip and decode it themselves. Base64 of
    float32 logprobs and int32 token ids holds about 5 bits of entropy per 8: the binary answer
    of bench row 19 travels at 14.9 MiB instead of 27.3 MiB."""
    import gzip

    if len(data) < GZIP_MIN_BYTES or not accepts_gzip:
        return Response(data, media_type="application/json")
    return Response(
        gzip.compress(data, compresslevel=1), media_type="application/json",
        headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
    )  # fmt: skip


async def endpoint(raw_request: Request) -> Any:
    """The route: vLLM's API-key check where the server has keys, the body parsed and checked
    here (so that bad input is a 400 naming the field, not FastAPI's 422), then
    `sequence_logprobs`, cancelled when the client leaves (vLLM's `with_cancellation`), and
    counted on `/metrics` (endpoint `sequence_logprobs`, mode `sequences`)."""
    guard = getattr(raw_request.app.state, "vllm_loglik_api_keys", None)
    if guard is not None and not guard.verify_token(raw_request.headers):
        return JSONResponse(content={"error": "Unauthorized"}, status_code=401)
    start = time.perf_counter()
    outcome: int | str = HTTPStatus.BAD_REQUEST
    model = None
    try:
        request = parse(await raw_request.body())
        model = request.model
        response = await with_cancellation(_answer)(request, raw_request)
        outcome = "cancelled" if response is None else response.status_code
        return response
    except RequestError as e:
        return error_response(str(e), e.param, HTTPStatus.BAD_REQUEST)
    except ScoringFault as e:
        outcome = HTTPStatus.INTERNAL_SERVER_ERROR
        return internal_error_response(e)
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except Exception:
        outcome = HTTPStatus.INTERNAL_SERVER_ERROR
        raise
    finally:
        models = getattr(raw_request.app.state, "openai_serving_models", None)
        metrics().answered(
            "sequence_logprobs", "sequences", outcome, model_label(model, models),
            time.perf_counter() - start,
        )  # fmt: skip


async def _answer(request: SequenceLogprobsRequest, raw_request: Request) -> Any:
    return await sequence_logprobs(request, raw_request)


#: The route's request body in `/openapi.json` (the body is read by `endpoint`, not FastAPI).
OPENAPI_EXTRA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SequenceLogprobsRequest.model_json_schema()}},
    }
}


def api_key_guard(args: Any) -> Any:
    """vLLM's `AuthenticationMiddleware` for the server's keys (`--api-key`, else
    `VLLM_API_KEY`), as vLLM builds it for `/v1`; None when the server has none."""
    from vllm import envs
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    tokens = [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]
    return AuthenticationMiddleware(None, tokens) if tokens else None  # type: ignore[arg-type]

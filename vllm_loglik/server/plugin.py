"""The entry point: `LoglikelihoodPlugin`, and the two routes it wraps.

The plugin uses one public extension point of vLLM: an entry point in the
`vllm.endpoint_plugins` group (`vllm/plugins/endpoint_plugins/interface.py`), loaded by the API
server only when named in `VLLM_PLUGINS`::

    VLLM_PLUGINS=loglikelihood vllm serve MODEL

`attach_router` replaces POST `/v1/completions` and `/v1/chat/completions` with routes whose
request models are vLLM's own plus the `loglikelihood` field (so `/openapi.json` documents it).
A request without the field, or with `loglikelihood: false`, is handed to the original route's
endpoint unchanged: streaming, tools, errors and generation behave as without the plugin. The
routes keep the original routes' dependencies; `--api-key` is enforced by vLLM's middleware,
which guards every `/v1` path. `init_state` builds the per-app `ServerScoring` from the engine
client. A completions request without the field that only scores with `echo` (`echo.py`) is
handed to the original endpoint too, marked, so that the completion handler's engine client
(which `init_state` sets to `echo.EchoEngineClient`) computes its prompts with echo
acceleration; vLLM's handler still makes the response.

Each scoring request is counted on vLLM's `/metrics` (`metrics.py`), in every API-server
process when there are several. When the engine process dies, the server logs it and exits
with a non-zero status (`engine_death.py`), where vLLM's own exits with 0.

What the route replacement relies on in vLLM (`RELIES_ON`): the original routes' endpoints,
which it calls, and `with_cancellation`, which cancels a handler whose client left (vLLM 0.32
then returns None, 0.33 an empty `Response()`; the wrapper learns of a cancellation from the
handler's task, which marks its answer, so either holds). The replacement routes copy every attribute
of the originals that FastAPI documents or validates with (`response_model`, `responses`,
`openapi_extra`, ...), so `/openapi.json` stays vLLM's own but for the field. Where the code of
any of it differs from every verified version (`vllm_loglik.fingerprints`), the routes are still
replaced, since they are the field itself, and the server logs what changed.

On the two routes, the plugin also caps the body size (`BodyLimit`, HTTP 413: the caps are in
`limits.py`) and answers a body that is not JSON at all in the OpenAI error shape (`_Route`);
with the API's middleware and a route class, both public FastAPI extension points.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from argparse import Namespace
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.datastructures import State
from starlette.exceptions import HTTPException  # what FastAPI raises; its own subclasses it

from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from ..reliance import Reliance, checked, report
from . import engine_death
from .chat import score_chat
from .completions import score_completion
from .echo import FALLBACK_REASON as ECHO_FALLBACK
from .echo import PLAN, echo_plan
from .engine import ScoringFault, ServerScoring
from .limits import Limits
from .metrics import metrics, mode_of, model_label
from . import teacher
from .protocol import (
    LoglikelihoodChatCompletionRequest,
    LoglikelihoodCompletionRequest,
    error_response,
    internal_error_response,
)

logger = logging.getLogger("vllm.loglik.server")

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

#: The vLLM code that the route replacement relies on (see the module docstring).
RELIES_ON = Reliance(
    "routes",
    (
        "vllm.entrypoints.serve.utils.api_utils:with_cancellation",
        "vllm.entrypoints.openai.completion.api_router:create_completion",
        "vllm.entrypoints.openai.chat_completion.api_router:create_chat_completion",
    ),
    "the routes are replaced all the same",
)

#: The `APIRoute` attributes that the replacement routes take from the originals: what FastAPI
#: documents in `/openapi.json` and validates or encodes responses with. `dependencies` and
#: `tags` are copied as lists.
ROUTE_ATTRIBUTES = (
    "response_model", "status_code", "summary", "description", "response_description",
    "responses", "deprecated", "operation_id", "response_model_include",
    "response_model_exclude", "response_model_by_alias", "response_model_exclude_unset",
    "response_model_exclude_defaults", "response_model_exclude_none", "include_in_schema",
    "name", "openapi_extra",
)  # fmt: skip

#: Marked by the scoring handler's task when it has its answer: a list that the route gives
#: each request, which the task (running in a copy of the route's context) appends to. An
#: unmarked return of `with_cancellation` is a client that left: it cancels the task and
#: returns at once, without waiting for the task to see its cancellation.
_ANSWERED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "vllm_loglik_answered", default=None
)

Handler = Callable[[Any, Request], Awaitable[Any]]


def _route(app: FastAPI, path: str) -> APIRoute | None:
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods:
            return route
    return None


def _wrap(original: APIRoute, request_model: type, handler: Handler, label: str) -> Handler:
    """The route's endpoint: the original one for a request without `loglikelihood`, else
    `handler`, cancelled when the client leaves, and counted in the metrics as `label`."""
    original_endpoint = original.endpoint

    async def marked(request: Any, raw_request: Request) -> Any:
        response = await handler(request, raw_request)
        answered = _ANSWERED.get()
        if answered is not None:
            answered.append(True)
        return response

    scored = with_cancellation(marked)

    async def endpoint(request: Any, raw_request: Request):
        if not request.loglikelihood:
            if label == "completions":
                return await _echo_or_original(original_endpoint, request, raw_request)
            return await original_endpoint(request, raw_request)
        start = time.perf_counter()
        answered: list[bool] = []
        token = _ANSWERED.set(answered)
        outcome: int | str = "cancelled"
        try:
            response = await scored(request, raw_request)
            # Unanswered, the client left: vLLM 0.32's with_cancellation then returns None,
            # 0.33's an empty Response().
            if answered:
                outcome = getattr(response, "status_code", HTTPStatus.OK)
            return response
        except ScoringFault as e:
            # A fault in computing the scores. vLLM's fallback handler would answer a
            # ValueError with a 400 that quotes it; this is never the client's mistake.
            # Everything else (vLLM's own generation handler, the engine's errors) goes to
            # vLLM's exception handlers, as without the plugin.
            outcome = HTTPStatus.INTERNAL_SERVER_ERROR
            return internal_error_response(e)
        except asyncio.CancelledError:
            outcome = "cancelled"  # the server cancelled the route itself (shutting down)
            raise
        except Exception as e:
            # vLLM's handlers answer a ValueError with a 400, anything else with a 500.
            outcome = 400 if isinstance(e, ValueError) else 500
            raise
        finally:
            _ANSWERED.reset(token)
            _count(raw_request, request, label, outcome, time.perf_counter() - start)

    # FastAPI reads the body model from the annotation.
    endpoint.__annotations__ = {"request": request_model, "raw_request": Request}
    endpoint.__name__ = original_endpoint.__name__
    endpoint.__doc__ = original_endpoint.__doc__
    return endpoint


def _count(raw_request: Request, request: Any, label: str, outcome: int | str, seconds: float) -> None:
    """Count an answered scoring request; a fault here is logged, never raised over the answer."""
    try:
        models = getattr(raw_request.app.state, "openai_serving_models", None)
        metrics().answered(
            label, mode_of(request.loglikelihood), outcome, model_label(request.model, models),
            seconds,
        )  # fmt: skip
    except Exception:
        logger.exception("vllm-loglik: a scoring request could not be counted")


async def _echo_or_original(original: Handler, request: Any, raw_request: Request) -> Any:
    """A completions request without the field, answered by vLLM's own endpoint; with echo
    acceleration (`echo.py`) where it only scores and the server accelerates echo requests."""
    scoring: ServerScoring | None = getattr(raw_request.app.state, "vllm_loglik", None)
    if scoring is None or (scoring.echo is None and not scoring.echo_unverified):
        return await original(request, raw_request)
    models = getattr(raw_request.app.state, "openai_serving_models", None)
    model = model_label(request.model, models)
    plan = echo_plan(request, model)
    if plan is None:
        return await original(request, raw_request)
    if scoring.echo is None:  # the installed vLLM's code differs: vLLM's own answer, counted
        metrics().fallbacks.labels(ECHO_FALLBACK).inc()
        return await original(request, raw_request)
    token = PLAN.set(plan)
    try:
        return await original(request, raw_request)
    finally:
        PLAN.reset(token)
        metrics().echo_requests.labels(model).inc()


class _BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body passes the cap. An HTTPException, which
    FastAPI's body reading passes on as it is (any other exception there becomes its 400
    parse error); `_Route` and `BodyLimit` answer it with the 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        self.max_bytes = max_bytes


class BodyLimit:
    """ASGI middleware: HTTP 413 for a body on `paths` of more than `max_bytes`, judged by its
    Content-Length before anything is read, and counted while it streams in otherwise."""

    def __init__(self, app: Any, paths: frozenset[str], max_bytes: int):
        self.app = app
        self.paths = paths
        self.max_bytes = max_bytes

    def _response(self) -> Any:
        return too_large_response(self.max_bytes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._response()(scope, receive, send)
        received = 0
        started = False

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def watched(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _BodyTooLarge:
            if not started:
                await self._response()(scope, receive, send)


def too_large_response(max_bytes: int) -> Any:
    return error_response(
        f"the request body is larger than {max_bytes:,} bytes (VLLM_LOGLIK_MAX_BODY_BYTES)",
        None,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    )


#: What FastAPI raises (as an HTTPException) for a body that it cannot read as JSON at all.
PARSE_ERROR = "There was an error parsing the body"


class _Route(APIRoute):
    """The plugin's routes: a body that is not JSON at all (FastAPI's `PARSE_ERROR`, e.g. for
    invalid UTF-8) gets a 400 in the OpenAI error shape too, as every other bad input."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Any]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Any:
            try:
                return await handler(request)
            except _BodyTooLarge as e:
                return too_large_response(e.max_bytes)
            except HTTPException as e:
                if e.status_code != HTTPStatus.BAD_REQUEST or e.detail != PARSE_ERROR:
                    raise
                return error_response(
                    f"{PARSE_ERROR}: the body must be a JSON object in UTF-8", None,
                    HTTPStatus.BAD_REQUEST,
                )  # fmt: skip

        return route_handler


class LoglikelihoodPlugin:
    """The `vllm.endpoint_plugins` entry point (see `vllm.plugins.endpoint_plugins.interface`)."""

    name = "loglikelihood"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        limits = Limits.from_env()
        app.add_middleware(
            BodyLimit, paths=frozenset((COMPLETIONS, CHAT, teacher.PATH)),
            max_bytes=limits.max_body_bytes,
        )  # fmt: skip
        router = APIRouter(route_class=_Route)
        metrics()  # made here, in each API-server process, before any request
        for path, model, handler, label in (
            (COMPLETIONS, LoglikelihoodCompletionRequest, score_completion, "completions"),
            (CHAT, LoglikelihoodChatCompletionRequest, score_chat, "chat"),
        ):
            original = _route(app, path)
            if original is None:
                continue
            kept = {a: getattr(original, a) for a in ROUTE_ATTRIBUTES if hasattr(original, a)}
            router.add_api_route(
                path,
                _wrap(original, model, handler, label),
                methods=["POST"],
                dependencies=list(original.dependencies),
                tags=list(original.tags or []),
                **kept,
            )
        # TRL's teacher route (`teacher.py`): a route of its own, which stock vLLM lacks.
        router.add_api_route(
            teacher.PATH, teacher.endpoint, methods=["POST"], tags=["vllm-loglik"],
            summary="Teacher logprobs of token sequences (TRL's request)",
            openapi_extra=teacher.OPENAPI_EXTRA,
        )  # fmt: skip
        app.include_router(router)
        engine_death.watch_lifespan(app)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        # No engine (the CPU-only render server): the routes then behave as the originals,
        # and a loglikelihood request gets an error from the missing state.
        state.vllm_loglik = ServerScoring(engine_client, state) if engine_client else None
        state.vllm_loglik_api_keys = teacher.api_key_guard(args)
        if state.vllm_loglik is not None:
            state.vllm_loglik.install_echo(state)
            routes = checked(RELIES_ON)
            if not routes.holds:
                logger.warning("vllm-loglik: %s", routes.describe())
            death = engine_death.watch(engine_client)
            report("server", [*state.vllm_loglik.fast_paths(), routes.describe(),
                              "exit status 1 after the engine dies: " + ("on" if death else "off")])  # fmt: skip

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
client.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.datastructures import State

from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from .chat import score_chat
from .completions import score_completion
from .engine import ScoringFault, ServerScoring
from .protocol import (
    LoglikelihoodChatCompletionRequest,
    LoglikelihoodCompletionRequest,
    internal_error_response,
)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

Handler = Callable[[Any, Request], Awaitable[Any]]


def _route(app: FastAPI, path: str) -> APIRoute | None:
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == path and "POST" in route.methods:
            return route
    return None


def _wrap(original: APIRoute, request_model: type, handler: Handler) -> Handler:
    original_endpoint = original.endpoint
    scored = with_cancellation(handler)

    async def endpoint(request: Any, raw_request: Request):
        if not request.loglikelihood:
            return await original_endpoint(request, raw_request)
        try:
            return await scored(request, raw_request)
        except ScoringFault as e:
            # A fault in computing the scores. vLLM's fallback handler would answer a
            # ValueError with a 400 that quotes it; this is never the client's mistake.
            # Everything else (vLLM's own generation handler, the engine's errors) goes to
            # vLLM's exception handlers, as without the plugin.
            return internal_error_response(e)

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
        for path, model, handler in (
            (COMPLETIONS, LoglikelihoodCompletionRequest, score_completion),
            (CHAT, LoglikelihoodChatCompletionRequest, score_chat),
        ):
            original = _route(app, path)
            if original is None:
                continue
            router.add_api_route(
                path,
                _wrap(original, model, handler),
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

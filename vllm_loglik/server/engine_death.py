"""When the engine dies, the API server says so and exits with a non-zero status.

vLLM's API server stops itself when its engine process dies (`terminate_if_errored` in
`vllm/entrypoints/launchers/launcher.py`: every request in flight gets an error, and uvicorn
shuts down), but the process then exits with status 0, as after a clean shutdown. A supervisor
that restarts failed services only (systemd's `Restart=on-failure`, a job scheduler, a script
that checks `$?`) would leave it down. With the plugin:

- `watch` (from `init_state`) wraps the `shutdown` method of this server's engine client, on
  that object only, to note that vLLM is stopping the engine on purpose: on SIGTERM or Ctrl-C,
  `serve_http` calls it before it stops the HTTP server.
- `watch_lifespan` (from `attach_router`) wraps the app's lifespan, a public FastAPI hook: when
  the server shuts down, it finds the engine dead (vLLM's own condition, `errored` and not
  `is_running`) and not stopped on purpose only after the engine died. It then logs one line
  that says so and why the server stops, and the process exits with `EXIT_STATUS` at the end of
  its normal shutdown (an `atexit` hook, which runs after vLLM's shutdown has finished, then
  ends the process with that status).

This relies on how vLLM's launcher stops (`RELIES_ON`); where that code differs from every
verified version's, nothing is wrapped and the server exits as vLLM's does.

`VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1` (and, on vLLM 0.33, an engine client that asks to keep the
server alive), vLLM's ways of keeping the server up without an engine, keep it up here too.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from ..reliance import Reliance, checked

logger = logging.getLogger("vllm.loglik.server")

#: How vLLM's launcher stops the server: on a signal (the engine client's `shutdown`, then the
#: HTTP server), or when the engine died (`terminate_if_errored`).
RELIES_ON = Reliance(
    "engine_death",
    (
        "vllm.entrypoints.launchers.launcher:serve_http",
        "vllm.entrypoints.launchers.launcher:terminate_if_errored",
    ),
    "the API server exits as vLLM's does (status 0, also after the engine died)",
)
#: Set on an engine client whose `shutdown` is wrapped, and once it was called (vLLM stops it
#: on purpose).
WATCHED, STOPPING = "_vllm_loglik_watched", "_vllm_loglik_stopping"

#: The status with which the API server exits after its engine died.
EXIT_STATUS = 1


def engine_dead(engine_client: Any) -> bool:
    """vLLM's own condition for stopping the server (`terminate_if_errored`)."""
    return bool(engine_client.errored) and not engine_client.is_running


def watch(engine_client: Any) -> bool:
    """Note when vLLM stops `engine_client` on purpose; False where the launcher's code is not
    verified (nothing is wrapped then)."""
    if not checked(RELIES_ON).holds or not hasattr(engine_client, "shutdown"):
        return False
    original = engine_client.shutdown

    def shutdown(*args: Any, **kwargs: Any) -> Any:
        setattr(engine_client, STOPPING, True)
        return original(*args, **kwargs)

    engine_client.shutdown = shutdown
    setattr(engine_client, WATCHED, True)
    return True


def watch_lifespan(app: Any) -> None:
    """Wrap `app`'s lifespan so that a shutdown after the engine died exits with `EXIT_STATUS`."""
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with original(app_) as state:
            yield state
            engine_client = getattr(app_.state, "engine_client", None)
            if engine_client is not None and _died(engine_client):
                logger.error(
                    "vllm-loglik: the engine process has died; the API server shuts down and "
                    "exits with status %d, so that a supervisor restarts it", EXIT_STATUS,
                )  # fmt: skip
                atexit.register(_exit_with_status)

    app.router.lifespan_context = lifespan


def _died(engine_client: Any) -> bool:
    """The engine died: dead, not stopped on purpose, and not kept alive by vLLM's switches."""
    from vllm import envs

    if not getattr(engine_client, WATCHED, False) or getattr(engine_client, STOPPING, False):
        return False
    if envs.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH or getattr(engine_client, "should_keep_api_server_alive", False):
        return False
    try:
        return engine_dead(engine_client)
    except Exception:  # an engine client of another shape: vLLM's own exit, unchanged
        return False


def _exit_with_status() -> None:
    # Registered last, so it runs first among the atexit hooks, after vLLM's shutdown (the
    # engine client's) is done; the hooks it skips belong to the dead engine's processes.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(EXIT_STATUS)

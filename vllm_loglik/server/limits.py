"""Caps on the work that one scoring request may ask for, each set by an environment variable.

A public endpoint receives whatever anyone sends; these bound what one request can cost the
server before any engine work starts. Past a cap, the request is refused: HTTP 413 for the body
size and the total tokens, HTTP 400 naming the field for the others, always in the OpenAI error
shape, with the variable to raise in the message.

| variable | default | what |
| --- | --- | --- |
| `VLLM_LOGLIK_MAX_BODY_BYTES` | 33554432 (32 MiB) | bytes of a request body on the three routes (413) |
| `VLLM_LOGLIK_MAX_CONTINUATIONS` | 64 | items of `loglikelihood.continuations` |
| `VLLM_LOGLIK_MAX_SCORED_TOKENS` | 1048576 | prompt tokens sent to the engine to score one request, over all its prompts, continuations and windows (413) |
| `VLLM_LOGLIK_MAX_ROLLING_WINDOWS` | 4096 | windows of one rolling prompt |
| `VLLM_LOGLIK_MAX_TOP_LOGPROBS` | the server's `--max-logprobs` (vLLM's default 20) | alternatives per scored token |
| `VLLM_LOGLIK_MAX_N` | 128 | `n` of a request that scores and generates (each choice repeats the entries) |

vLLM's own caps apply as well, for example `VLLM_MAX_COMPLETION_PROMPTS` (prompts per request)
and `VLLM_MAX_N_SEQUENCES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ..jobs import Job
from ..protocol import DEFAULT_MAX_CONTINUATIONS
from ..requests import RequestError, env_int, max_continuations_from_env


class TooLarge(RequestError):
    """A request past a cap on its size: HTTP 413."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_continuations: int = DEFAULT_MAX_CONTINUATIONS
    max_scored_tokens: int = 1 << 20
    max_rolling_windows: int = 4096
    #: None: the engine's `max_logprobs` (`--max-logprobs`) is the only cap.
    max_top_logprobs: int | None = None
    max_n: int = 128

    @classmethod
    def from_env(cls) -> Limits:
        d = cls()
        return cls(
            max_body_bytes=env_int("VLLM_LOGLIK_MAX_BODY_BYTES", d.max_body_bytes, 1),
            max_continuations=max_continuations_from_env(),
            max_scored_tokens=env_int("VLLM_LOGLIK_MAX_SCORED_TOKENS", d.max_scored_tokens, 1),
            max_rolling_windows=env_int(
                "VLLM_LOGLIK_MAX_ROLLING_WINDOWS", d.max_rolling_windows, 1
            ),
            max_top_logprobs=(
                env_int("VLLM_LOGLIK_MAX_TOP_LOGPROBS", 0, 0)
                if os.environ.get("VLLM_LOGLIK_MAX_TOP_LOGPROBS") else None
            ),
            max_n=env_int("VLLM_LOGLIK_MAX_N", d.max_n, 1),
        )

    def check_request(self, request: Any) -> None:
        """The caps that the request's own fields show, before its jobs are built."""
        n = getattr(request, "n", None) or 1
        if n > self.max_n:
            raise RequestError(
                "n", f"n is {n}; with loglikelihood at most {self.max_n} (VLLM_LOGLIK_MAX_N)"
            )

    def check_top_logprobs(self, k: int, field: str, max_logprobs: int) -> None:
        """`k` within the server's cap: `VLLM_LOGLIK_MAX_TOP_LOGPROBS` where set, and the
        engine's `max_logprobs` (`--max-logprobs`) always."""
        if self.max_top_logprobs is not None and k > min(self.max_top_logprobs, max_logprobs):
            raise RequestError(
                field,
                f"{field} is {k}; loglikelihood entries allow at most "
                f"{min(self.max_top_logprobs, max_logprobs)} (VLLM_LOGLIK_MAX_TOP_LOGPROBS)",
            )
        if k > max_logprobs:
            raise RequestError(
                field,
                f"{field} is {k}; this server allows at most {max_logprobs} (its "
                "--max-logprobs; start it with a larger one for more)",
            )

    def check_jobs(self, jobs: list[Job], rolling: bool) -> None:
        """The caps on the engine work of a request's jobs: windows and scored tokens."""
        if rolling:
            for job in jobs:
                if len(job.spans) > self.max_rolling_windows:
                    raise RequestError(
                        "prompt",
                        f"prompt needs {len(job.spans):,} rolling windows; at most "
                        f"{self.max_rolling_windows:,} per prompt (VLLM_LOGLIK_MAX_ROLLING_WINDOWS)",
                    )
        tokens = sum(len(span.prompt_token_ids) for job in jobs for span in job.spans)
        if tokens > self.max_scored_tokens:
            raise TooLarge(
                "prompt",
                f"the request would score {tokens:,} prompt tokens; at most "
                f"{self.max_scored_tokens:,} per request (VLLM_LOGLIK_MAX_SCORED_TOKENS): "
                "split it into several requests",
            )

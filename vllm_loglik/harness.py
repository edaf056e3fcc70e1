"""lm-evaluation-harness models that score through a server's `loglikelihood` field.

Importing this module registers three lm-eval models: `vllm-loglik-offline`, in process
(`vllm_loglik.harness_offline`), and two that go through a server:

* `vllm-loglik`: `/v1/completions`. `loglikelihood` sends each context once, with all of its
  continuations in `loglikelihood.continuations` (the server computes the context once);
  `loglikelihood_rolling` sends each text once with `"scope": "rolling"`; `generate_until` is
  lm-eval's own `local-completions`.
* `vllm-loglik-chat`: `/v1/chat/completions`, run with `--apply_chat_template`. `loglikelihood`
  sends each conversation once, with the continuations as candidate assistant messages that
  continue the generation prompt (`continue_final_message`), so they are scored as lm-eval's
  `hf` backend scores a continuation after the chat template's generation prompt; the server
  renders its own chat template. `generate_until` is lm-eval's `local-chat-completions`.

Both ask for the compact response (`content: false`): one `(logprob, is_greedy)` per
continuation, and nothing per token. Their `--model_args` are those of `local-completions` and
`local-chat-completions`: `base_url` (the full endpoint URL), `model`, `num_concurrent`,
`max_retries`, `timeout`; the server tokenizes, so no tokenizer is needed. The requests go
through lm-eval's own `amodel_call`, with its retries (tenacity) and its aiohttp session, and
results are stored in lm-eval's request cache (`--use_cache`) per request, as its models do.

From the command line, `vllm-loglik eval [lm_eval arguments]` registers the models and runs
lm-eval's CLI unchanged. From Python, import this module before
`lm_eval.simple_evaluate(model="vllm-loglik", ...)`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.api_models import JsonChatStr
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

from .protocol import DEFAULT_MAX_CONTINUATIONS

#: Concurrent requests when `num_concurrent` is not given: each request carries all the
#: continuations of one context, and the server batches what is in flight.
DEFAULT_CONCURRENCY = 16


@dataclass
class ScoreRequest:
    """One request to the server: a context (or conversation) and its continuations, or a
    rolling text; `indices` are the positions of its results in lm-eval's request list."""

    body: dict[str, Any]
    indices: list[int] = field(default_factory=list)


def entry_results(response: dict[str, Any]) -> list[tuple[float, bool]]:
    """`(logprob, is_greedy)` per entry of a response's first choice."""
    entries = response["choices"][0]["loglikelihood"]
    return [(float(e["logprob"]), bool(e["is_greedy"])) for e in entries]


class _ScoringMixin:
    """What both models add to lm-eval's `TemplateAPI`: requests with the `loglikelihood`
    field, sent concurrently through lm-eval's `amodel_call`."""

    max_continuations: int = DEFAULT_MAX_CONTINUATIONS

    def create_message(self, messages: Any, generate: bool = False) -> Any:
        if isinstance(messages, ScoreRequest):
            return messages
        return super().create_message(messages, generate)  # type: ignore[misc]

    def _create_payload(self, messages: Any, generate: bool = False, **kwargs: Any) -> dict:
        if isinstance(messages, ScoreRequest):
            return {"model": self.model, "max_tokens": 0, **messages.body}  # type: ignore[attr-defined]
        return super()._create_payload(messages, generate=generate, **kwargs)  # type: ignore[misc]

    @staticmethod
    def parse_logprobs(outputs: Any, tokens: Any = None, ctxlens: Any = None, **kwargs: Any):
        responses = outputs if isinstance(outputs, list) else [outputs]
        return [r for response in responses for r in entry_results(response)]

    def _send(self, requests: list[ScoreRequest], total: int, disable_tqdm: bool) -> list[Any]:
        """Send `requests`, `num_concurrent` at a time, and return the result of each of the
        `total` positions that they cover."""
        from aiohttp import ClientSession, ClientTimeout, TCPConnector
        from tenacity import retry, stop_after_attempt, wait_exponential
        from tqdm import tqdm

        results: list[Any] = [None] * total
        concurrency = max(1, self._concurrent)  # type: ignore[attr-defined]

        async def run() -> None:
            sem = asyncio.Semaphore(concurrency)
            connector = TCPConnector(limit=concurrency, ssl=self.verify_certificate)  # type: ignore[attr-defined]
            timeout = ClientTimeout(total=self.timeout)  # type: ignore[attr-defined]
            call = retry(
                stop=stop_after_attempt(self.max_retries),  # type: ignore[attr-defined]
                wait=wait_exponential(multiplier=0.5, min=1, max=10),
                reraise=True,
            )(self.amodel_call)  # type: ignore[attr-defined]
            with tqdm(total=total, desc="Scoring", disable=disable_tqdm) as bar:
                async with ClientSession(connector=connector, timeout=timeout) as session:

                    async def one(request: ScoreRequest) -> None:
                        answers = await call(
                            session=session, sem=sem, messages=request, generate=False
                        )
                        if answers is None or len(answers) != len(request.indices):
                            raise RuntimeError(
                                f"the server returned {0 if answers is None else len(answers)} "
                                f"scores for {len(request.indices)} requests"
                            )
                        for i, answer in zip(request.indices, answers, strict=True):
                            results[i] = answer
                        bar.update(len(request.indices))

                    await asyncio.gather(*(one(r) for r in requests))

        asyncio.run(run())
        return results

    def _pairs_requests(self, pairs: Sequence[tuple[Any, str]]) -> list[ScoreRequest]:
        """One request per context, with at most `max_continuations` continuations each."""
        by_context: dict[Any, list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            by_context.setdefault(self._context_key(context), []).append(i)
        requests = []
        for members in by_context.values():
            for at in range(0, len(members), self.max_continuations):
                chunk = members[at : at + self.max_continuations]
                context = pairs[chunk[0]][0]
                continuations = [pairs[i][1] for i in chunk]
                requests.append(ScoreRequest(self._pair_body(context, continuations), chunk))
        return requests

    def _context_key(self, context: Any) -> Any:
        return context.prompt if isinstance(context, JsonChatStr) else context

    def _pair_body(self, context: Any, continuations: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args[:2]) for req in requests]
        results = self._send(self._pairs_requests(pairs), len(pairs), disable_tqdm)
        for pair, result in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)  # type: ignore[attr-defined]
        return results


def _model_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("num_concurrent", DEFAULT_CONCURRENCY)
    return kwargs


@register_model("vllm-loglik")
class VLLMLoglikCompletions(_ScoringMixin, LocalCompletionsAPI):
    """lm-eval's `local-completions`, with loglikelihoods from the server's `loglikelihood`
    field: each context is sent once with all of its continuations, and rolling texts are
    scored by the server in lm-eval's windows."""

    def __init__(
        self,
        base_url: str | None = None,
        tokenizer_backend: str | None = None,
        max_continuations: int = DEFAULT_MAX_CONTINUATIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url=base_url, tokenizer_backend=tokenizer_backend, **_model_args(kwargs))
        self.max_continuations = int(max_continuations)

    def _pair_body(self, context: Any, continuations: list[str]) -> dict[str, Any]:
        if isinstance(context, JsonChatStr):
            raise ValueError(
                "vllm-loglik scores text contexts through /v1/completions; to score under the "
                "server's chat template, use --model vllm-loglik-chat with --apply_chat_template"
            )
        return {
            "prompt": context,
            "loglikelihood": {"continuations": continuations, "content": False},
        }

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        scored = self._send(
            [
                ScoreRequest(
                    {"prompt": text, "loglikelihood": {"scope": "rolling", "content": False}}, [i]
                )
                for i, text in enumerate(texts)
            ],
            len(texts),
            disable_tqdm,
        )
        results = [logprob for logprob, _ in scored]
        for text, result in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results


@register_model("vllm-loglik-chat")
class VLLMLoglikChat(_ScoringMixin, LocalChatCompletion):
    """lm-eval's `local-chat-completions`, with loglikelihoods from the server's
    `loglikelihood` field under the server's chat template (run with `--apply_chat_template`).
    lm-eval's own chat models refuse loglikelihood requests."""

    def __init__(
        self,
        base_url: str | None = None,
        max_continuations: int = DEFAULT_MAX_CONTINUATIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url=base_url, **_model_args(kwargs))
        self.max_continuations = int(max_continuations)

    def _pair_body(self, context: Any, continuations: list[str]) -> dict[str, Any]:
        if not isinstance(context, JsonChatStr):
            raise ValueError(
                "vllm-loglik-chat needs the conversation: run lm_eval with --apply_chat_template"
            )
        messages = json.loads(context.prompt)
        if messages and messages[-1].get("role") == "assistant":
            raise ValueError(
                "vllm-loglik-chat scores continuations as the assistant's reply; a task whose "
                "context ends with an assistant message (gen_prefix) is not supported"
            )
        return {
            "messages": messages,
            "add_generation_prompt": False,
            "continue_final_message": True,
            "loglikelihood": {"continuations": continuations, "content": False},
        }

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "rolling loglikelihood is scored through /v1/completions: use --model vllm-loglik"
        )


# The in-process model, `vllm-loglik-offline` (it imports vLLM only when it is built).
from . import harness_offline  # noqa: E402, F401

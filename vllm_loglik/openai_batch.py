"""The OpenAI Batch file format in `vllm-loglik score`.

An input line of that format is one request::

    {"custom_id": "q1", "method": "POST", "url": "/v1/completions", "body": {...}}

with `url` `/v1/completions` or `/v1/chat/completions`, and an output line is its answer, in the
same place as in the input::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "req_...", "body": {...}}, "error": null}

`body` is the body that the server (`vllm serve` with the plugin) would have answered:

- **With `loglikelihood`** (true, or its options), the plugin's response: a `text_completion`
  or `chat.completion` whose choices hold the `loglikelihood` entries, as the server returns
  them (per-token `content` unless `content: false`; the CLI's `--details` does not apply). The
  CLI scores, so a body's `max_tokens` is taken as 0, as in the CLI's own format.
- **Without it**, a `/v1/completions` body is answered as vLLM answers it: `echo` with
  `logprobs` and `max_tokens: 0` is the prompt's scoring (`choices[0].logprobs`: `tokens`,
  `token_logprobs`, `top_logprobs`, `text_offset`), and a body that generates generates. In
  this process that goes through vLLM's own pieces: its `CompletionRequest` validates the body
  and makes the sampling parameters, the engine runs them, and its completion handler's
  `request_output_to_completion_response` builds the response. A chat body without
  `loglikelihood` generates a reply, which this process does not do (it has no chat handler):
  its line's error says so; `--server` sends it to the server as it is.

A line that fails gets `response.status_code` (400, or the server's) with the server's error
body, and the same error in `error` (`code`, `message`, `param`). A `label` at the top of an
input line (the index of a multiple-choice line's right continuation) is carried to its
output line, for `vllm-loglik report`. The format is detected per file, from its first line
that is not blank.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .requests import RequestError

URLS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class BatchLine:
    """One input line of the OpenAI Batch format."""

    custom_id: Any
    url: str
    body: dict[str, Any]
    label: Any = None

    @property
    def chat(self) -> bool:
        return self.url == "/v1/chat/completions"

    @property
    def scores(self) -> bool:
        """Whether the body asks for `loglikelihood` (the plugin's answer, not vLLM's own)."""
        return self.body.get("loglikelihood") not in (None, False)


def is_batch_file(path: Path) -> bool:
    """Whether `path` is in the OpenAI Batch format: its first line that is not blank is a
    JSON object with `custom_id` and `body`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            if text.strip():
                return is_batch_line(text)
    return False


def is_batch_line(text: str) -> bool:
    try:
        first = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(first, dict) and "custom_id" in first and "body" in first


def parse(line: dict[str, Any]) -> BatchLine:
    """The request of an input line (its JSON object); a `RequestError` naming the field that
    is wrong."""
    if line.get("custom_id") is None:
        raise RequestError("custom_id", "a line of the OpenAI Batch format needs `custom_id`")
    if line.get("method", "POST") != "POST":
        raise RequestError("method", f"method is {line.get('method')!r}: only POST is supported")
    url = line.get("url")
    if url not in URLS:
        raise RequestError("url", f"url is {url!r}: it must be one of {', '.join(URLS)}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise RequestError("body", "body must be a JSON object (the request body)")
    if body.get("stream"):
        raise RequestError("body.stream", "a batch request must not be sent in stream mode")
    return BatchLine(line["custom_id"], url, body, line.get("label"))


def output_line(custom_id: Any, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    """The output line of a request: `body` answered with `status`; an error body (status not
    200) is repeated in `error`."""
    error = None
    if status != 200:
        info = body.get("error") if isinstance(body, dict) else None
        if not isinstance(info, dict):  # an error body of another shape: its text
            info = {"message": json.dumps(info if info is not None else body)[:500]}
        error = {"code": info.get("type") or str(status), "message": info.get("message", ""),
                 "param": info.get("param")}  # fmt: skip
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": error,
    }


def error_body(message: str, param: str | None, status: int = 400) -> dict[str, Any]:
    """The server's error body (`vllm_loglik.server.protocol.error_response`)."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}.get(status, "Error")
    return {"error": {"message": message, "type": kind, "param": param or None, "code": status}}


def usage(prompt_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}


def scores_body(chat: bool, model: str, entries: list[dict[str, Any]], prompt_tokens: int,
                n: int = 1) -> dict[str, Any]:  # fmt: skip
    """The server's response to a scoring request that generates nothing (`max_tokens: 0`):
    `vllm_loglik.server.responses.completion_response` and `chat_response`."""
    if chat:
        choice = {"message": {"role": "assistant", "content": ""}}
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"text": ""}
        kind, prefix = "text_completion", "cmpl"
    choices = [
        {"index": j, **choice, "logprobs": None, "finish_reason": "length", "stop_reason": None,
         "loglikelihood": entries}
        for j in range(n)
    ]  # fmt: skip
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens)}  # fmt: skip


# ---------------------------------------------------------------- vLLM's own completions


def _vllm_completion_pieces() -> tuple[Any, Any, Any]:
    """vLLM's `CompletionRequest`, `OpenAIServingCompletion` and `get_max_tokens` (0.32 and
    0.33 keep them in the same modules)."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

    return CompletionRequest, OpenAIServingCompletion, get_max_tokens


def system_fingerprint(vllm_config: Any) -> str | None:
    """The engine's `system_fingerprint`, as vLLM's handlers compute it at start-up (vLLM's
    version and a hash of the engine's configuration); None where vLLM has no such function."""
    try:
        from vllm.entrypoints.serve.utils.fingerprint import get_system_fingerprint

        return get_system_fingerprint(vllm_config)
    except Exception:  # as vLLM's handlers: never fail over the fingerprint
        return None


@dataclass
class NativeCompletion:
    """A `/v1/completions` body without `loglikelihood`, ready for the engine."""

    request: Any  # vLLM's CompletionRequest
    prompts: list[tuple[str, list[int]]]  # (text, token ids) of each prompt
    params: list[Any]  # SamplingParams per prompt

    @property
    def tokens(self) -> int:
        return sum(len(ids) for _, ids in self.prompts)


class NativeCompletions:
    """What vLLM's completion handler does with a body, on an `LLM` in this process: validate
    it (`CompletionRequest`), tokenize its prompts as the server does (with the body's
    `add_special_tokens`), make each prompt's sampling parameters (`get_max_tokens`,
    `to_sampling_params` with the model's generation config), and build the response from the
    engine's outputs (`request_output_to_completion_response`)."""

    def __init__(self, llm: Any):
        self.CompletionRequest, serving_class, self.get_max_tokens = _vllm_completion_pieces()
        self.model_config = llm.llm_engine.model_config
        self.tokenizer = llm.get_tokenizer()
        self.defaults = self.model_config.get_diff_sampling_param()
        mc = self.model_config  # as the completion handler sets it at start-up
        self.override_max_tokens = (
            self.defaults.get("max_tokens")
            if mc.generation_config not in ("auto", "vllm")
            else (getattr(mc, "override_generation_config", None) or {}).get("max_new_tokens")
        )
        # The handler's response builder reads only these attributes of the handler.
        serving = object.__new__(serving_class)
        serving.enable_prompt_tokens_details = False
        serving.enable_per_request_metrics = False
        serving.return_tokens_as_token_ids = False
        serving.system_fingerprint = system_fingerprint(llm.llm_engine.vllm_config)
        self.serving = serving

    def prepare(self, body: dict[str, Any]) -> NativeCompletion:
        from pydantic import ValidationError

        from .requests import completion_prompts

        try:
            request = self.CompletionRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise RequestError(param or "", f"{first.get('msg')} ({param})") from None
        except ValueError as e:
            raise RequestError("", str(e)) from None
        for name in ("use_beam_search", "truncate_prompt_tokens", "stream"):
            if getattr(request, name, None):
                raise RequestError(
                    f"body.{name}", f"{name} is not supported in this process: send the file "
                    "with --server, and the server answers it"
                )  # fmt: skip
        prompts = []
        for prompt in completion_prompts(request.prompt):
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
                prompts.append((prompt, list(ids)))
            else:
                prompts.append((self.tokenizer.decode(prompt), list(prompt)))
        params = []
        for _, ids in prompts:
            try:
                max_tokens = self.get_max_tokens(
                    self.model_config.max_model_len, request.max_tokens, len(ids), self.defaults,
                    self.override_max_tokens,
                )
            except ValueError as e:
                raise RequestError("prompt", str(e)) from None
            params.append(request.to_sampling_params(max_tokens, self.defaults))
        return NativeCompletion(request, prompts, params)

    def response(self, native: NativeCompletion, outputs: list[Any], model: str) -> dict[str, Any]:
        for out, (text, _) in zip(outputs, native.prompts, strict=True):
            if out.prompt is None:
                out.prompt = text
        metadata = SimpleNamespace(final_usage_info=None)
        response = self.serving.request_output_to_completion_response(
            outputs, native.request, f"cmpl-{uuid.uuid4().hex}", int(time.time()), model,
            self.tokenizer, metadata,
        )  # fmt: skip
        return response.model_dump()


def native_protocol(native: NativeCompletion, name: str) -> Any:
    """An `engine_stream` protocol that runs the prompts as they are and returns the engine's
    `RequestOutput`s."""
    from .engine_requests import EngineRequest

    outputs = yield [
        EngineRequest(ids, params, f"{name}-{i}")
        for i, ((_, ids), params) in enumerate(zip(native.prompts, native.params, strict=True))
    ]
    return outputs

"""From the body of a scoring request to jobs: what the server and the batch CLI share.

A request body is what a client POSTs to `/v1/completions` (`prompt`) or `/v1/chat/completions`
(`messages`) with the `loglikelihood` field. The server reads it from vLLM's request models, and
`vllm-loglik score` from a JSON line; both build their jobs here, so a line can be moved between
the two unchanged and give the same numbers. Bad input is a `RequestError` that names the field
(`param`): the server answers it with HTTP 400, the CLI writes it as the line's error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .jobs import Job, Scorer
from .protocol import DEFAULT_MAX_CONTINUATIONS, LoglikelihoodOptions
from .spans import check_text
from .words import WordsError, check_offsets


class RequestError(ValueError):
    """Bad input: `param` names the field (HTTP 400 on the server)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def json_object(text: str, what: str) -> dict[str, Any]:
    """The JSON object of an input line; a `RequestError` if it is not JSON or not an object
    (`what` says what the line should hold)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError("", f"the line is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError("", f"the line must be a JSON object ({what})")
    return value


def env_int(name: str, default: int, low: int = 0, high: int | None = None) -> int:
    """The integer setting `name` of the environment (`default` when unset), within bounds."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        top = "" if high is None else f" to {high}"
        raise ValueError(f"{name} must be at least {low}{top}, got {value}")
    return value


def max_continuations_from_env() -> int:
    """`VLLM_LOGLIK_MAX_CONTINUATIONS`: the cap of the server and of the batch CLI."""
    return env_int("VLLM_LOGLIK_MAX_CONTINUATIONS", DEFAULT_MAX_CONTINUATIONS, 1)


def check_continuations(options: LoglikelihoodOptions, max_continuations: int) -> None:
    continuations = options.continuations
    if continuations is None:
        return
    field = "loglikelihood.continuations"
    if not continuations:
        raise RequestError(field, f"{field} must not be empty")
    if len(continuations) > max_continuations:
        raise RequestError(
            field,
            f"{field} has {len(continuations)} items; at most {max_continuations} are allowed "
            "(VLLM_LOGLIK_MAX_CONTINUATIONS)",
        )
    for i, text in enumerate(continuations):
        if text == "":
            raise RequestError(f"{field}[{i}]", f"{field}[{i}] must not be an empty string")
        if text == []:
            raise RequestError(f"{field}[{i}]", f"{field}[{i}] must not be an empty list of token ids")


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions request, as a list (vLLM's four accepted shapes)."""
    if prompt is None or prompt == []:
        raise RequestError("prompt", "prompt is required with loglikelihood")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    if not isinstance(prompt, list):
        raise RequestError("prompt", "prompt must be a string, a list of token ids, or a list of either")
    return [p if isinstance(p, str) else list(p) for p in prompt]


def completion_jobs(
    scorer: Scorer, prompt: str | list[int], p: int, count: int, options: LoglikelihoodOptions
) -> list[Job]:
    """The jobs of prompt `p` of `count` of a completions request."""
    if options.scope == "last_message":
        raise RequestError(
            "loglikelihood.scope",
            "loglikelihood.scope 'last_message' is only for /v1/chat/completions; "
            "completions score the prompt, continuations of it, or a rolling text",
        )
    if options.scope == "rolling" and options.continuations is not None:
        raise RequestError(
            "loglikelihood.scope",
            "loglikelihood.scope 'rolling' scores the whole prompt; it cannot be combined "
            "with loglikelihood.continuations",
        )
    where = f"prompt[{p}]" if count > 1 else "prompt"
    if isinstance(prompt, str):
        # Checked here, so that a context that cannot be encoded is not reported against the
        # continuation it was paired with.
        try:
            check_text(prompt, where)
        except ValueError as e:
            raise RequestError(where, str(e)) from None
    try:
        if options.scope == "rolling":
            return [scorer.rolling(prompt)]
        if options.continuations is None:
            return [scorer.prompt(prompt)]
        jobs = []
        for i, continuation in enumerate(options.continuations):
            field = f"loglikelihood.continuations[{i}]"
            if not isinstance(continuation, str):
                check_token_ids(scorer, continuation, field)
            try:
                if isinstance(prompt, str) and isinstance(continuation, str):
                    jobs.append(scorer.pair(prompt, continuation))
                else:
                    jobs.append(scorer.pair_ids(prompt, continuation))
            except ValueError as e:
                raise RequestError(field, f"{where} with {field}: {e}") from None
        return jobs
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(where, f"{where}: {e}") from None


def check_token_ids(scorer: Scorer, ids: list[int], field: str) -> None:
    """A `RequestError` naming `field[j]` for the first id outside the model's vocabulary."""
    j = scorer.tokens.first_unknown(ids)
    if j is not None:
        raise RequestError(
            f"{field}[{j}]",
            f"{field}[{j}] is token id {ids[j]}, outside the model's vocabulary (0 to "
            f"{scorer.tokens.vocab_size - 1})",
        )


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """The request's messages with text content, as the chat template takes them."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            try:
                message = dict(message)
            except (TypeError, ValueError):
                raise RequestError(f"messages[{i}]", f"messages[{i}] must be an object") from None
        message = dict(message)
        content = message.get("content")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            if not isinstance(content, list):
                raise RequestError(
                    f"messages[{i}].content",
                    f"messages[{i}].content must be a string or a list of text parts",
                )
            parts = []
            for part in content:
                try:
                    part = dict(part)
                except (TypeError, ValueError):
                    part = {}
                if part.get("type") != "text" or not isinstance(part.get("text", ""), str):
                    raise RequestError(
                        f"messages[{i}].content",
                        f"messages[{i}].content: only text parts can be scored with loglikelihood",
                    )
                parts.append(part.get("text", ""))
            content = "\n".join(parts)
        try:
            check_text(content, f"messages[{i}].content")
        except ValueError as e:
            raise RequestError(f"messages[{i}].content", str(e)) from None
        message["content"] = content
        out.append(message)
    return out


def chat_jobs(
    scorer: Scorer,
    messages: Any,
    options: LoglikelihoodOptions,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[Job]:
    """The jobs of a chat request: the rendered prompt, the last message, or candidates."""
    if options.scope == "rolling":
        raise RequestError(
            "loglikelihood.scope",
            "loglikelihood.scope 'rolling' is only for /v1/completions; chat scores the "
            "rendered prompt, the last message or candidate messages",
        )
    messages = chat_messages(messages)
    kwargs = dict(chat_template_kwargs or {})
    if kwargs and scorer.tokens.is_mistral:
        raise RequestError(
            "chat_template_kwargs",
            "chat_template_kwargs is not supported with a mistral-common tokenizer "
            "(tokenizer_mode=mistral), which encodes the conversation itself",
        )
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        if options.continuations is not None:
            jobs = []
            for i, text in enumerate(options.continuations):
                if not isinstance(text, str):
                    field = f"loglikelihood.continuations[{i}]"
                    raise RequestError(
                        field,
                        f"{field}: token ids are scored after a completions prompt; on "
                        "/v1/chat/completions a continuation is a candidate message's text",
                    )
                try:
                    jobs.append(scorer.chat(messages, text, kwargs))
                except ValueError as e:
                    field = f"loglikelihood.continuations[{i}]"
                    raise RequestError(field, f"{field}: {e}") from None
            return jobs
        if options.scope == "last_message":
            last = len(messages) - 1
            if messages[last]["content"] == "":
                field = f"messages[{last}].content"
                raise RequestError(
                    field,
                    f"{field} must not be empty: the last message is the one scored, and an "
                    "empty (or absent) content leaves none of its text to score",
                )
            return [scorer.chat(messages, None, kwargs)]
        return [
            scorer.chat_prompt(messages, add_generation_prompt and not continue_final_message, kwargs)
        ]
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError("messages", f"messages: {e}") from None


# ---------------------------------------------------------------- one pass: body -> jobs


@dataclass
class Translation:
    """What a request body asks for, as jobs: the one pass from a body's fields to the engine's
    work, which the server (then its own checks: caps, the engine) and the batch CLI share."""

    #: The jobs of each prompt (completions: one group per prompt; chat: one group).
    groups: list[list[Job]]
    #: Alternatives per scored token, and the request field it came from (for a cap's message).
    top_logprobs: int
    top_logprobs_field: str
    #: `True`, `False` (the compact entries) or `"arrays"`.
    content: bool | str
    rolling: bool = False
    #: The words asked for, if any, and whether corrected (the engine then computes P_B).
    words: bool = False
    corrected_words: bool = False
    #: The temperature of the distribution scored (1: the model's own).
    temperature: float = 1.0

    @property
    def jobs(self) -> list[Job]:
        return [job for group in self.groups for job in group]


def _top_logprobs(options: LoglikelihoodOptions, fallback: int | None, name: str) -> tuple[int, str]:
    """The alternatives per token: the field's own `top_logprobs`, else the request's `name`
    (which the compact response ignores: it lists no tokens)."""
    if options.top_logprobs is not None:
        if options.top_logprobs and options.content is False:
            raise RequestError(
                "loglikelihood.top_logprobs",
                "loglikelihood.top_logprobs needs loglikelihood.content: true or \"arrays\"; "
                "the compact response (content: false) lists no tokens",
            )
        return options.top_logprobs, "loglikelihood.top_logprobs"
    if options.content is not True:
        return 0, name
    return max(fallback or 0, 0), name


def translate_completion(
    scorer: Scorer,
    options: LoglikelihoodOptions,
    prompt: Any,
    logprobs: int | None,
    max_continuations: int,
) -> Translation:
    """A `/v1/completions` body's `loglikelihood`, `prompt` and `logprobs`, as jobs."""
    check_continuations(options, max_continuations)
    k, k_field = _top_logprobs(options, logprobs, "logprobs")
    prompts = completion_prompts(prompt)
    groups = []
    for p, one in enumerate(prompts):
        jobs = completion_jobs(scorer, one, p, len(prompts), options)
        where = f"prompt[{p}]" if len(prompts) > 1 else "prompt"
        if options.continuations is None:
            labels = [where]
        else:
            labels = [f"loglikelihood.continuations[{i}]" for i in range(len(jobs))]
        groups.append(_with_words(scorer, jobs, labels, options))
    return _translation(groups, k, k_field, options)


def translate_chat(
    scorer: Scorer,
    options: LoglikelihoodOptions,
    messages: Any,
    top_logprobs: int | None,
    max_continuations: int,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> Translation:
    """A `/v1/chat/completions` body's `loglikelihood`, `messages`, `top_logprobs` (the
    request's own, where `logprobs` is on) and template options, as jobs."""
    check_continuations(options, max_continuations)
    k, k_field = _top_logprobs(options, top_logprobs, "top_logprobs")
    jobs = chat_jobs(
        scorer, messages, options, chat_template_kwargs=chat_template_kwargs,
        add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
    )  # fmt: skip
    if options.continuations is None:
        labels = ["messages"]
    else:
        labels = [f"loglikelihood.continuations[{i}]" for i in range(len(jobs))]
    return _translation([_with_words(scorer, jobs, labels, options)], k, k_field, options)


def _translation(
    groups: list[list[Job]], k: int, k_field: str, options: LoglikelihoodOptions
) -> Translation:
    words = options.words not in (None, False)
    temperature = 1.0 if options.temperature is None else float(options.temperature)
    if temperature != 1 and words:
        raise RequestError(
            "loglikelihood.temperature",
            "loglikelihood.temperature cannot be combined with loglikelihood.words: word "
            "scores are of the model's own distribution",
        )
    return Translation(
        groups, k, k_field, options.content, rolling=options.scope == "rolling", words=words,
        corrected_words=words and options.word_probability == "corrected",
        temperature=temperature,
    )  # fmt: skip


def _with_words(
    scorer: Scorer, jobs: list[Job], labels: list[str], options: LoglikelihoodOptions
) -> list[Job]:
    """`jobs` with the words of `options.words` laid on them: one list of offsets for every
    entry, or (several continuations) one list per continuation."""
    value = options.words
    if value is None or value is False:
        return jobs
    field = "loglikelihood.words"
    per_entry = (
        value is not True and bool(value) and all(
            isinstance(item, list) and item and isinstance(item[0], list) for item in value
        )
    )  # fmt: skip
    if per_entry and len(value) != len(jobs):
        raise RequestError(
            field,
            f"{field} holds {len(value)} lists of offsets, one per continuation; the request "
            f"has {len(jobs)} entries",
        )
    corrected = options.word_probability == "corrected"
    out = []
    for j, (job, label) in enumerate(zip(jobs, labels, strict=True)):
        spec, where = (value[j], f"{field}[{j}]") if per_entry else (value, field)
        try:
            offsets = True if spec is True else check_offsets(spec, where)
            out.append(scorer.with_words(job, offsets, corrected, where))
        except WordsError as e:
            message = str(e) if per_entry or len(jobs) == 1 else f"{e} (in {label})"
            raise RequestError(e.field, message) from None
        except ValueError as e:
            raise RequestError(where, f"{where}: {e} (in {label})") from None
    return out

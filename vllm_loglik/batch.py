"""`vllm-loglik score`: score a JSON Lines file of requests, with progress, streaming output and
resume.

Each input line is the JSON body that you would POST to the server: a `prompt` (completions)
or `messages` (chat), the `loglikelihood` field (`true` when absent), and optionally `model`,
a LoRA adapter of `--lora-modules` (or the base model, which scores a line without it).
An `id`, if present, is carried through. Each output line answers the input line of the same
number, in order::

    {"id": ..., "line": N, "loglikelihood": [entries]}
    {"id": ..., "line": N, "error": {"message": ..., "param": ...}}

Entries are compact by default: `index`, `text`, `logprob`, `num_tokens`, `is_greedy`,
`perplexity`, `num_bytes` (UTF-8 bytes of the scored text) and `bits_per_byte`, what corpus
filters use. `details` adds each entry's per-token `content`, as the server returns it; a
line whose `loglikelihood` asks for `"content": "arrays"` gets `arrays` (its scored tokens' ids,
logprobs, ranks and top k as base64 arrays: DPO's reference logprobs of a dataset, precomputed).

The engine is fed continuously: lines are read ahead until the tokens in flight reach a budget,
each line's spans go through the protocol of `vllm_loglik.engine_requests` (a shared context
is computed once), and the engine's `step()` loop advances all of them at once. Output is
written in input order and flushed as soon as the next line is done, so an interrupted run
loses nothing written, and a run on the same output file resumes after its last line.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .engine_requests import (
    corrected_words_problem,
    engine_max_logprobs,
    lora_mixing_unsafe,
    score_spans,
)
from .adapters import Adapters
from . import openai_batch
from .engine_stream import DEFAULT_BUDGET_TOKENS, EngineStream
from .jobs import Job, Scorer
from .openai_batch import BatchLine, NativeCompletion, NativeCompletions
from .protocol import DEFAULT_MAX_CONTINUATIONS, parse_loglikelihood
from .requests import (
    RequestError,
    Translation,
    completion_prompts,
    json_object,
    max_continuations_from_env,
    translate_chat,
    translate_completion,
)
from .runners import runner_of
from .scoring import Score

#: Set (by the CLI's SIGINT and SIGTERM handler) to stop a run at its next safe point: between
#: engine steps and between records, never inside vLLM's own code, which may catch and swallow
#: an interrupt raised at a random place.
STOP = threading.Event()


class Interrupted(Exception):
    """A run stopped because `STOP` was set; everything written so far is whole."""


class ServerUnavailable(Exception):
    """With `--server`: a line got no answer from the server (unreachable, or a 5xx) for
    `retry_seconds`; the run stops, and every line written so far is whole, so the same command
    resumes after them."""


#: With `--server`, how long a line keeps being sent again while the server is unreachable or
#: answers with a server error (a 5xx: a restart, an engine that died), before the run stops.
DEFAULT_RETRY_SECONDS = 120.0


def check_stop() -> None:
    if STOP.is_set():
        raise Interrupted


@dataclass
class Work:
    """One input line: its jobs, or the error that replaces them."""

    line: int
    id: Any = None
    model: Any = None  # the line's `model`: None or the base model's name, or an adapter's
    jobs: list[Job] = field(default_factory=list)
    top_logprobs: int = 0
    words: bool = False  # the engine computes word-boundary masses (corrected words)
    content: bool | str = False  # entries carry per-token `content` (or `arrays`)
    temperature: float = 1.0  # of the distribution scored
    label: Any = None  # the index of a multiple-choice line's right continuation
    openai: BatchLine | None = None  # a line of the OpenAI Batch format
    native: NativeCompletion | None = None  # ... whose body vLLM's own handler answers
    error: dict[str, Any] | None = None
    status: int = 400  # the HTTP status of the error, in the OpenAI Batch format

    @property
    def tokens(self) -> int:
        if self.native is not None:
            return self.native.tokens
        return sum(len(s.prompt_token_ids) for job in self.jobs for s in job.spans)


def parse_line(
    scorer: Scorer,
    text: str | dict[str, Any],
    line: int,
    details: bool,
    max_continuations: int = DEFAULT_MAX_CONTINUATIONS,
    native: NativeCompletions | None = None,
) -> Work:
    """The jobs of one input line (its JSON text, or the body already parsed), or a `Work`
    holding the line's error. With `native` (vLLM's completions on this engine), the line is
    one of the OpenAI Batch format (`vllm_loglik.openai_batch`)."""
    work = Work(line)
    try:
        if native is not None:
            request = read_openai_line(work, text)
            body, work.label = request.body, request.label
            work.model = body.get("model")
            if not request.scores:
                if request.chat:
                    raise RequestError(
                        "body.loglikelihood", "a chat body without `loglikelihood` generates a "
                        "reply, which vllm-loglik score in process does not do: add "
                        "`loglikelihood`, or send the file with --server",
                    )  # fmt: skip
                work.native = native.prepare(body)
                return work
            if request.chat:  # the request's own alternatives, as the server reads them
                logprobs = body.get("top_logprobs") if body.get("logprobs") else 0
            else:
                logprobs = body.get("logprobs")
            translation = translate_body(scorer, body, max_continuations, logprobs, request.chat)
            work.content, work.temperature = translation.content, translation.temperature
            work.jobs, work.top_logprobs = translation.jobs, translation.top_logprobs
            work.words = translation.corrected_words
            return work
        body = text if isinstance(text, dict) else load_body(text)
        work.id, work.label = body.get("id"), body.get("label")
        work.model = body.get("model")
        translation = translate_body(scorer, body, max_continuations, None, "messages" in body)
        work.jobs, work.words = translation.jobs, translation.corrected_words
        # Entries list their tokens with --details, and as arrays where the line asks for them.
        arrays = translation.content == "arrays"
        work.content = "arrays" if arrays else details
        work.top_logprobs = translation.top_logprobs if details or arrays else 0
        work.temperature = translation.temperature
    except RequestError as e:
        work.error = {"message": str(e)}
        if e.param:
            work.error["param"] = e.param
    return work


def load_body(text: str) -> dict[str, Any]:
    """The request body of an input line."""
    return json_object(text, "a request body")


def read_openai_line(work: Work, text: str | dict[str, Any]) -> BatchLine:
    """The request of an OpenAI Batch line, kept in `work.openai`. Before that, `work.openai`
    holds what is known of the line (nothing, then its custom_id once it is read as JSON), so
    that a line in error is still answered in the format, under its custom_id if it has one."""
    work.openai = BatchLine(None, "", {})
    line = text if isinstance(text, dict) else json_object(text, "an OpenAI Batch request")
    work.openai = BatchLine(line.get("custom_id"), "", {})
    work.openai = openai_batch.parse(line)
    return work.openai


def translate_body(
    scorer: Scorer, body: dict[str, Any], max_continuations: int, logprobs: Any, chat: bool
) -> Translation:
    """The server's translation of a body (`logprobs`: the request's own alternatives per
    token, which the field's options may take)."""
    try:
        options = parse_loglikelihood(body.get("loglikelihood", True))
    except ValueError as e:
        raise RequestError("loglikelihood", str(e)) from None
    if options is False:
        raise RequestError("loglikelihood", "loglikelihood is false: the line asks for no score")
    if options is True or options is None:
        options = parse_loglikelihood({})
    if chat:
        if "messages" not in body:
            raise RequestError("messages", "a chat body needs `messages`")
        return translate_chat(
            scorer, options, body["messages"], logprobs, max_continuations,
            chat_template_kwargs=body.get("chat_template_kwargs"),
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
        )  # fmt: skip
    else:
        if "prompt" not in body:
            raise RequestError("prompt", "a line needs `prompt` (completions) or `messages` (chat)")
        prompts = completion_prompts(body["prompt"])
        if len(prompts) != 1:
            raise RequestError("prompt", "one prompt per line: put each prompt of a batch on a line")
        return translate_completion(scorer, options, prompts[0], logprobs, max_continuations)


def compact(entry: dict[str, Any]) -> dict[str, Any]:
    """A server or offline entry with the corpus-filter figures added: perplexity, the UTF-8
    bytes of the scored text, and bits per byte."""
    logprob, tokens = entry["logprob"], entry["num_tokens"]
    num_bytes = len(entry["text"].encode("utf-8", errors="surrogatepass"))
    entry["perplexity"] = math.exp(-logprob / tokens) if tokens else None
    entry["num_bytes"] = num_bytes
    entry["bits_per_byte"] = -logprob / math.log(2) / num_bytes if num_bytes else None
    return entry


def score_record(work: Work, scores: list[Score], model: str) -> dict[str, Any]:
    from .protocol import entry_from_score

    if work.openai is not None:
        entries = [entry_from_score(i, s, work.content) for i, s in enumerate(scores)]
        n = work.openai.body.get("n")
        body = openai_batch.scores_body(
            work.openai.chat, work.model or model, entries, work.tokens,
            n if isinstance(n, int) and n > 0 else 1,
        )  # fmt: skip
        return openai_record(work, body)
    record = {
        "id": work.id,
        "line": work.line,
        "loglikelihood": [compact(entry_from_score(i, s, work.content))
                          for i, s in enumerate(scores)],
    }  # fmt: skip
    return labelled(record, work.label)


def labelled(record: dict[str, Any], label: Any) -> dict[str, Any]:
    if label is not None:
        record["label"] = label
    return record


def openai_record(work: Work, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    """An output line of the OpenAI Batch format (with the `line` that orders it, which the
    writer leaves out)."""
    custom_id = work.openai.custom_id if work.openai is not None else None
    record = openai_batch.output_line(custom_id, body, status)
    return labelled({"line": work.line, **record}, work.label)


def error_record(work: Work) -> dict[str, Any]:
    if work.openai is not None:
        error = work.error or {}
        body = openai_batch.error_body(error.get("message", ""), error.get("param"), work.status)
        return openai_record(work, body, work.status)
    return labelled({"id": work.id, "line": work.line, "error": work.error}, work.label)


# ---------------------------------------------------------------- output: order, resume


def resume_point(path: Path) -> int:
    """The number of complete lines in an earlier output file (0 if there is none), after
    cutting a partial last line: the run resumes after them."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data.count(b"\n", 0, end)


class OrderedWriter:
    """Writes records in line order, each as soon as every earlier line is written, flushed."""

    def __init__(self, out: IO[str], first_line: int):
        self.out = out
        self.next = first_line
        self.waiting: dict[int, dict[str, Any]] = {}
        self.failed = 0

    def add(self, record: dict[str, Any]) -> int:
        """Queue `record`; returns how many lines were written."""
        self.waiting[record["line"]] = record
        written = 0
        while self.next in self.waiting:
            rec = self.waiting.pop(self.next)
            if "custom_id" in rec:  # the OpenAI Batch format has no `line`
                rec = {k: v for k, v in rec.items() if k != "line"}
            self.failed += rec.get("error") is not None
            self.out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.next += 1
            written += 1
        if written:
            self.out.flush()
        return written


def input_lines(path: Path, skip: int) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its newline) of each input line after the first
    `skip`; a blank line is a line too (it becomes an error record), so numbers always match
    the file's."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, text in enumerate(f, start=1):
            if n > skip:
                yield n, text.rstrip("\r\n")


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + (
            1 if path.stat().st_size and not _ends_with_newline(path) else 0
        )


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ---------------------------------------------------------------- the two runners


@dataclass
class Progress:
    """Lines done, scored tokens per second and the time left, on a tqdm bar."""

    total: int
    done: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.monotonic)
    bar: Any = None

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=self.done, unit="line", dynamic_ncols=True)

    def update(self, lines: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(lines)

    def close(self) -> None:
        self.bar.close()


def scored_tokens(record: dict[str, Any]) -> int:
    if "custom_id" in record:
        body = (record.get("response") or {}).get("body") or {}
        return ((body.get("usage") or {}).get("prompt_tokens")) or 0
    return sum(e["num_tokens"] for e in record.get("loglikelihood") or [])


#: Takes each output record as soon as it is ready (not in line order).
Emit = Callable[[dict[str, Any]], None]
#: `(line number, JSON text or parsed body)` of each input line.
Lines = Iterator[tuple[int, "str | dict[str, Any]"]]


def run_engine(
    llm: Any,
    lines: Lines,
    emit: Emit,
    details: bool,
    budget_tokens: int = DEFAULT_BUDGET_TOKENS,
    adapters: Adapters | None = None,
    openai: bool = False,
) -> None:
    """Score `lines` on `llm`'s engine, keeping about `budget_tokens` in flight; each line's
    record goes to `emit` as soon as it is done. A line's `model` picks the base model or one
    of `adapters` (by default, the base model only). With `openai`, the lines are in the
    OpenAI Batch format (`vllm_loglik.openai_batch`)."""
    from .offline import scorer_for

    scorer = scorer_for(llm)
    native = NativeCompletions(llm) if openai else None
    model = served_name(llm)
    adapters = adapters or Adapters.of(llm)
    stream = EngineStream(llm)
    works: dict[int, Work] = {}
    max_continuations = max_continuations_from_env()
    words_problem = corrected_words_problem(
        llm.llm_engine.vllm_config, "loglikelihood.word_probability"
    )
    config = llm.llm_engine.vllm_config
    max_logprobs = engine_max_logprobs(config.model_config)
    runner = runner_of(config)

    # Where the engine's LoRA kernels mix base-model and adapter requests up (vLLM's CPU
    # build: `lora_mixing_unsafe`), lines of the other kind wait until those in flight are done.
    separate = lora_mixing_unsafe(llm.llm_engine.vllm_config)
    kind: bool | None = None  # in flight: True for adapters, False for the base model
    held: tuple[Work, Any] | None = None  # a line that waits for its kind's turn
    try:
        more = True
        while more or held or stream.active:
            check_stop()
            if not stream.active:
                kind = None
            while (more or held) and (stream.tokens_in_flight < budget_tokens or not stream.active):
                if held is not None:
                    (work, lora_request), held = held, None
                else:
                    try:
                        n, text = next(lines)
                    except StopIteration:
                        more = False
                        break
                    work = parse_line(scorer, text, n, details, max_continuations, native)
                    if work.words and words_problem is not None and work.error is None:
                        work.error = {
                            "message": words_problem, "param": "loglikelihood.word_probability"
                        }
                    if work.error is None:
                        work.error = engine_problem(work, max_logprobs, runner)
                    lora_request = None
                    try:
                        lora_request = adapters.resolve(work.model)
                    except RequestError as e:
                        if work.error is None:
                            work.error = {"message": str(e), "param": e.param}
                            work.status = 404  # the server's status for a model it does not serve
                    if work.error is not None:
                        emit(error_record(work))
                        continue
                if separate and kind is not None and kind != (lora_request is not None):
                    held = (work, lora_request)
                    break
                kind = lora_request is not None
                n = work.line
                if work.native is not None:
                    protocol = openai_batch.native_protocol(work.native, f"line{n}")
                else:
                    spans = [span for job in work.jobs for span in job.spans]
                    protocol = score_spans(
                        spans, work.top_logprobs, stream.block_size, f"line{n}", words=work.words,
                        runner=stream.runner, temperature=work.temperature,
                    )  # fmt: skip
                works[n] = work
                try:
                    rows = stream.submit(n, protocol, work.tokens, lora_request)
                except ValueError as e:  # refused by the engine's own input checks
                    rows = e
                if rows is not None:
                    emit(finish(scorer, works.pop(n), rows, model, native))
            for n, rows in stream.step() if stream.active else []:
                emit(finish(scorer, works.pop(n), rows, model, native))
    finally:
        stream.abort()


def engine_problem(work: Work, max_logprobs: int, runner: Any) -> dict[str, Any] | None:
    """The error of a line that this engine cannot score as asked, as the server's 400s say
    it: more alternatives than its `max_logprobs` (with corrected words on V1, two more), or a
    temperature where the runner's patch is off."""
    if work.top_logprobs > max_logprobs:
        return {
            "message": f"top_logprobs is {work.top_logprobs}; this engine allows at most "
            f"{max_logprobs} (its max_logprobs; --max-logprobs)",
            "param": "loglikelihood.top_logprobs",
        }
    refusal = runner.temperature_refusal(work.temperature, "loglikelihood.temperature")
    if refusal is not None:
        return {"message": refusal, "param": "loglikelihood.temperature"}
    if work.words:
        refusal = runner.words_refusal(work.top_logprobs, max_logprobs, "loglikelihood.top_logprobs")
        if refusal is not None:
            return {"message": refusal, "param": "loglikelihood.top_logprobs"}
    return None


def served_name(llm: Any) -> str:
    """The model's name in responses: the first `--served-model-name`, else the model."""
    config = llm.llm_engine.model_config
    served = config.served_model_name
    return (served[0] if isinstance(served, (list, tuple)) else served) or config.model


def finish(
    scorer: Scorer, work: Work, rows: list[Any] | Exception, model: str,
    native: NativeCompletions | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The record of a line from its protocol's rows, or from the exception it ended with."""
    if isinstance(rows, Exception):
        work.error = {"message": f"{type(rows).__name__}: {rows}"}
        return error_record(work)
    if work.native is not None:
        assert native is not None
        return openai_record(work, native.response(work.native, rows, work.model or model))
    scored = iter(rows)
    scores = [
        scorer.finish(job, [next(scored) for _ in job.spans], work.top_logprobs, work.content)
        for job in work.jobs
    ]
    return score_record(work, scores, model)


def run_server(
    url: str,
    model: str | None,
    lines: Iterator[tuple[int, str]],
    emit: Emit,
    details: bool,
    concurrency: int,
    api_key: str | None,
    retry_seconds: float = DEFAULT_RETRY_SECONDS,
    openai: bool = False,
) -> None:
    """Score `lines` through a server with the plugin: each line is POSTed as it is, with
    `max_tokens: 0`, the compact response unless `details`, and `model` (the line's own, an
    adapter or the base model; else `model`, or the server's first model).

    A line that gets no answer (the connection refused or dropped) or a server error (5xx) is
    sent again, with a growing pause, for up to `retry_seconds`: a server that restarts within
    that time loses the run nothing. After it, `ServerUnavailable`: the lines before are
    written, that line and those after it are not, and the next run resumes there.

    With `openai`, the lines are in the OpenAI Batch format: each body goes to its `url` (a
    scoring body with `max_tokens: 0`, any other as it is), and the server's answer, whatever
    its status, is the output line's `response`."""
    import asyncio

    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=None) as client:
            sender = Sender(client, url, retry_seconds)
            name = model or (await sender.get("/v1/models")).json()["data"][0]["id"]
            queue: asyncio.Queue = asyncio.Queue(maxsize=concurrency * 2)

            async def produce() -> None:
                for item in lines:
                    await queue.put(item)
                for _ in range(concurrency):
                    await queue.put(None)

            async def consume() -> None:
                while (item := await queue.get()) is not None:
                    check_stop()
                    n, text = item
                    if openai:
                        emit(await send_openai(sender, name, n, text))
                    else:
                        emit(await score_remote(sender, name, n, text, details))

            await asyncio.gather(produce(), *(consume() for _ in range(concurrency)))

    asyncio.run(main())


class Sender:
    """Requests to the server, each sent again while the server cannot answer it (see
    `run_server`)."""

    def __init__(self, client: Any, url: str, retry_seconds: float):
        self.client = client
        self.url = url
        self.retry_seconds = retry_seconds

    async def get(self, path: str) -> Any:
        return await self._send("GET", path, None)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._send("POST", path, body)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        import asyncio

        import httpx

        start = time.monotonic()
        pause = 0.5
        while True:
            try:
                response = await self.client.request(method, path, json=body)
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            if time.monotonic() - start >= self.retry_seconds:
                raise ServerUnavailable(
                    f"the server at {self.url} gave no answer for {self.retry_seconds:.0f} s "
                    f"(last: {problem})"
                )
            check_stop()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def score_remote(client: Any, model: str, n: int, text: str, details: bool) -> dict[str, Any]:
    work = Work(n)
    try:
        body = load_body(text)
    except RequestError as e:
        work.error = {"message": str(e)}
        return error_record(work)
    work.id = body.pop("id", None)
    work.label = body.pop("label", None)  # ours, not the server's
    field_value = body.get("loglikelihood", True)
    options = dict(field_value) if isinstance(field_value, dict) else {}
    if field_value is not True and not isinstance(field_value, dict) and field_value is not None:
        options = field_value  # let the server name the problem
    elif not details:
        options["content"] = False
        options.pop("top_logprobs", None)
    if body.get("model") is None:
        body["model"] = model
    body.update(max_tokens=0, loglikelihood=options)
    body.pop("max_completion_tokens", None)
    body.pop("stream", None)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = await client.post(path, body)
    data = response.json()
    if response.status_code != 200:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        work.error = {"message": error.get("message", response.text[:500])}
        if error.get("param"):
            work.error["param"] = error["param"]
        return error_record(work)
    entries = data["choices"][0]["loglikelihood"]
    record = {"id": work.id, "line": n, "loglikelihood": [compact(e) for e in entries]}
    return labelled(record, work.label)


async def send_openai(client: Any, model: str, n: int, text: str) -> dict[str, Any]:
    """The output line of an OpenAI Batch line, answered by the server."""
    work = Work(n)
    try:
        request = read_openai_line(work, text)
    except RequestError as e:
        work.error = {"message": str(e), "param": e.param}
        return error_record(work)
    work.label = request.label
    body = dict(request.body)
    if body.get("model") is None:
        body["model"] = model
    if request.scores:  # the CLI scores: nothing is generated
        body["max_tokens"] = 0
        body.pop("max_completion_tokens", None)
    response = await client.post(request.url, body)
    try:
        data = response.json()
    except ValueError:
        data = openai_batch.error_body(response.text[:500], None, response.status_code)
    return openai_record(work, data, response.status_code)


#: Scores the input lines after the first `skip` (given), passing each record to `emit`.
Runner = Callable[[int, Emit], None]


def score_file(input_path: Path, output_path: Path, run: Runner) -> int:
    """Score `input_path` into `output_path` with `run`, resuming after the lines an earlier
    run wrote; returns the number of lines that failed (in this run)."""
    done = resume_point(output_path)
    total = count_lines(input_path)
    if done > total:
        raise SystemExit(
            f"{output_path} has {done} lines, more than the {total} of {input_path}: "
            "it is not this input's output"
        )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "a", encoding="utf-8") as out:
        writer = OrderedWriter(out, done + 1)
        progress = Progress(total=total, done=done)

        def emit(record: dict[str, Any]) -> None:
            progress.update(writer.add(record), scored_tokens(record))
            check_stop()

        try:
            run(done, emit)
        finally:
            progress.close()
    return writer.failed

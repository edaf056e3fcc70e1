"""The engine requests that compute the scored positions of spans: one protocol for the offline
API and the server.

Every span is scored by one engine request with `SamplingParams(max_tokens=1,
prompt_logprobs=k, detokenize=False, flat_logprobs=True)`. Shared contexts are computed once:

1. **Warm-up.** When the engine has prefix caching on, a group of spans with the same context
   (the continuations of one context) whose context fills at least one KV block first prefills
   that context as a plain request (no logprobs), which stores its full blocks in the prefix
   cache. The prefix stops one token before the group's first scored position, so the logits
   that predict the first scored token are always computed.
2. **Scoring.** The spans of a warmed group are scored with `skip_reading_prefix_cache=False`,
   so the engine computes only the uncached tail. This is safe only with `detokenize=False`:
   vLLM leaves the cached positions' prompt logprobs unset, and detokenizing them kills the
   engine. Every other span is scored without reading the cache, as vLLM does by default for
   prompt logprobs.
3. **Fallback.** A cached span whose output cannot be read (its cache hit reached a scored
   position, for instance after the same prompt was scored before; an unknown layout; a missing
   entry) is scored again without the cache. Only if that output cannot be read either is it an
   `EngineOutputError`: a fault of the engine's output, never of the client's input.

The rows of a cached request come back in the layout of the engine's model runner (V1 on the
CPU, V2 by default on a GPU); `vllm_loglik.engine_output.span_logprobs` reads both, aligned by
`num_cached_tokens`.

`score_spans` is this protocol as a generator: it yields each batch of `EngineRequest`s, is
sent their outputs in the same order, and returns the `ScoredRows` of every span. The offline
API runs each batch with one `LLM.generate` call; the server runs each request through its
`EngineClient`, all of a batch at once. So both send the same requests and read them the same
way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine_output import (
    EngineOutputError,
    ScoredRows,
    require_span_logprobs,
    span_logprobs,
    unreadable_reason,
)
from .reliance import Reliance, checked
from .spans import Span
from .runners import Runner, runner_of

#: The CPU LoRA kernels, which decide whether base-model and adapter requests may share an
#: engine step (`lora_mixing_unsafe`).
LORA_RELIES_ON = Reliance(
    "lora_kernels",
    ("vllm.lora.ops.torch_ops.lora_ops",),
    "base-model and adapter requests take turns on the CPU",
)
#: The verified vLLM versions whose CPU LoRA kernels (those of `LORA_RELIES_ON`) skip the base
#: model's index -1: vLLM 0.33 and 0.34 (the same code) mask it (`lora/ops/torch_ops/lora_ops.py`),
#: 0.32 does not.
LORA_MASKS_BASE = ("0.33.0", "0.34.0")


@dataclass(frozen=True)
class EngineRequest:
    prompt_token_ids: list[int]
    params: Any  # vllm.SamplingParams
    request_id: str


@dataclass
class ProtocolStats:
    """What one run of `score_spans` sent and read: the server's metrics count these.

    `warmups` and `warmup_tokens`: shared-context warm-up requests and their prompt tokens;
    `requests` and `prompt_tokens`: the scoring requests and their prompt tokens (retries
    included); `cached_tokens`:
    prompt tokens that scoring requests read from the prefix cache; `fallbacks`: spans whose
    cached output could not be read and were scored again without the cache, by reason
    (`vllm_loglik.engine_output.unreadable_reason`)."""

    warmups: int = 0
    warmup_tokens: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)


#: What `score_spans` is: yields batches of requests, is sent their outputs, returns the rows.
Protocol = Generator[list[EngineRequest], list[Any], list[ScoredRows]]


def prefix_block_size(vllm_config: Any) -> int | None:
    """The engine's KV block size when the package reads its prefix cache, else None: what
    `score_spans` takes as `block_size`. It reads the cache when the engine has prefix caching
    on and its runner's cache reads apply (`cache_reads_problem`)."""
    cache = vllm_config.cache_config
    if not cache.enable_prefix_caching or cache_reads_problem(vllm_config) is not None:
        return None
    return cache.block_size


def cache_reads_problem(vllm_config: Any) -> str | None:
    """Why the package reads no prefix cache on an engine that has prefix caching on, or None."""
    if not vllm_config.cache_config.enable_prefix_caching:
        return None
    return runner_of(vllm_config).cache_reads_problem


#: Module names that put LoRA on the output layer, whose LoRA logits vLLM 0.32 computes with
#: the wrong mapping for prompt logprobs.
LM_HEAD_MODULES = ("lm_head", "logits_processor")


def lora_scoring_problem(vllm_config: Any) -> str | None:
    """Why prompt logprobs cannot be scored on this engine's LoRA configuration, or None.

    vLLM 0.32 computes the prompt logprobs of a request through a LoRA-wrapped output layer
    with a mapping of one entry per request instead of one per prompt position: the CPU engine
    dies when a step holds more than one request (an einsum shape error), and a GPU may return
    wrong numbers for an adapter that trains `lm_head` (vllm-project/vllm#16668, #51594). The
    output layer is wrapped whenever LoRA is on and `--lora-target-modules` is not given (or
    names it). With the adapters' own modules given (`q_proj ... down_proj`, not `lm_head`),
    scoring under an adapter is exact; this affects the base model's requests too."""
    lora = getattr(vllm_config, "lora_config", None)
    if lora is None:
        return None
    targets = lora.target_modules
    if targets is not None and not any(name in LM_HEAD_MODULES for name in targets):
        return None
    return (
        "scoring with LoRA enabled needs the engine's LoRA layers to leave the output layer "
        "alone: give --lora-target-modules (LLM(lora_target_modules=...)) the adapters' own "
        "modules, e.g. q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, without "
        "lm_head. vLLM computes prompt logprobs through a LoRA output layer with the wrong "
        "mapping (vllm-project/vllm#16668): it stops the CPU engine, and can give wrong numbers"
    )


def engine_max_logprobs(model_config: Any) -> int:
    """The engine's cap on logprobs per position (`max_logprobs`, `--max-logprobs`; vLLM's -1
    is the vocabulary's size)."""
    cap = model_config.max_logprobs
    return model_config.get_vocab_size() if cap == -1 else cap


def shared_prefix(spans: Sequence[Span], block_size: int | None) -> list[int] | None:
    """The prefix worth caching for `spans`, or None: their common prefix, cut one token before
    the first scored position, if it fills at least one KV block (`block_size`; None when the
    engine has no prefix caching)."""
    if block_size is None or not spans:
        return None
    first = spans[0].prompt_token_ids
    n = min(span.start for span in spans) - 1
    for span in spans[1:]:
        ids = span.prompt_token_ids
        n = min(n, len(ids))
        for i in range(n):
            if ids[i] != first[i]:
                n = i
                break
    return list(first[:n]) if n >= block_size else None


def warm_up_params() -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, detokenize=False)


def score_spans(
    spans: Sequence[Span],
    top_logprobs: int,
    block_size: int | None,
    request_id: str,
    warm_single: bool = False,
    stats: ProtocolStats | None = None,
    words: bool = False,
    runner: Runner | None = None,
    temperature: float = 1.0,
) -> Protocol:
    """The protocol (see the module docstring) for `spans`, as a generator.

    Spans with the same context (the same tokens before their first scored position: the
    continuations of one context, or the candidates of one conversation) form a group. Its
    context, less its last token, is warmed up if it fills a KV block and if the group has two
    spans or more, or one with `warm_single` (the server's choice: a client may send the same
    context again with its next continuation). Returns the `ScoredRows` of every span, in order;
    `stats`, if given, counts what was sent and read. With `words`, the rows also hold each
    position's word-boundary masses (`ScoredRows.starts` and `ends`). `runner` is the engine's
    (`vllm_loglik.runners.runner_of`), which decides the requests' fields (V1's when None);
    with a `temperature` other than 1, the logprobs are log softmax(logits / T) (the caller
    has checked the runner's `temperature_problem`).
    """
    stats = stats if stats is not None else ProtocolStats()
    runner = runner if runner is not None else V1_DEFAULT

    def params(span: Span, read_cache: bool) -> Any:
        n = len(span.prompt_token_ids)
        return runner.scoring_params(n, span.start, top_logprobs, read_cache, words, temperature)

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, span in enumerate(spans):
        groups.setdefault(tuple(span.prompt_token_ids[: span.start]), []).append(i)
    cached = [False] * len(spans)
    prefixes: dict[tuple[int, ...], None] = {}
    for members in groups.values():
        if len(members) == 1 and not warm_single:
            continue
        prefix = shared_prefix([spans[i] for i in members], block_size)
        if prefix is not None:
            prefixes[tuple(prefix)] = None
            for i in members:
                cached[i] = True
    if not spans:
        return []
    if prefixes:
        stats.warmups += len(prefixes)
        stats.warmup_tokens += sum(len(prefix) for prefix in prefixes)
        yield [
            EngineRequest(list(prefix), warm_up_params(), f"{request_id}-prefix-{i}")
            for i, prefix in enumerate(prefixes)
        ]
    stats.requests += len(spans)
    stats.prompt_tokens += sum(len(span.prompt_token_ids) for span in spans)
    outputs = yield [
        EngineRequest(
            span.prompt_token_ids, params(span, hit), f"{request_id}-{i}"
        )
        for i, (span, hit) in enumerate(zip(spans, cached, strict=True))
    ]
    rows: list[ScoredRows | None] = []
    for span, hit, out in zip(spans, cached, outputs, strict=True):
        stats.cached_tokens += out.num_cached_tokens or 0
        if hit:
            row = span_logprobs(
                out.prompt_logprobs, out.num_cached_tokens, span, top_logprobs, words,
                _masses(out, words),
            )  # fmt: skip
            if row is None:
                reason = unreadable_reason(out.prompt_logprobs, out.num_cached_tokens, span)
                stats.fallbacks[reason] += 1
            rows.append(row)
        else:
            rows.append(_require(out, span, top_logprobs, words))
    again = [i for i, r in enumerate(rows) if r is None]
    if again:
        stats.requests += len(again)
        stats.prompt_tokens += sum(len(spans[i].prompt_token_ids) for i in again)
        outputs = yield [
            EngineRequest(
                spans[i].prompt_token_ids,
                params(spans[i], False),
                f"{request_id}-{i}-full",
            )
            for i in again
        ]
        for i, out in zip(again, outputs, strict=True):
            rows[i] = _require(out, spans[i], top_logprobs, words)
    return rows  # type: ignore[return-value]  # no None is left


def _require(out: Any, span: Span, top_logprobs: int, words: bool = False) -> ScoredRows:
    return require_span_logprobs(
        out.prompt_logprobs, out.num_cached_tokens, span, out.request_id, top_logprobs, words,
        _masses(out, words),
    )  # fmt: skip


def _masses(out: Any, words: bool) -> Any:
    """The word-boundary masses that V2 returns as token-id scores (`vllm_loglik.v2_scoring`),
    or None (V1 returns them in the prompt logprobs' own columns)."""
    return getattr(out, "prompt_token_id_logprobs", None) if words else None


#: The runner assumed where a caller gives none: V1's requests (no V2 fields).
V1_DEFAULT = Runner("V1", False, None, None, None)


async def last_output(stream: Any, request_id: str) -> Any:
    """The final output of an engine request's output stream (`EngineClient.generate`)."""
    final = None
    async for out in stream:
        final = out
    if final is None:
        raise EngineOutputError(f"engine request {request_id} returned no output")
    return final


def run_sync(protocol: Protocol, run: Any) -> list[ScoredRows]:
    """Drive `protocol`, running each batch with `run(batch) -> outputs` (the offline API)."""
    try:
        batch = next(protocol)
        while True:
            batch = protocol.send(run(batch))
    except StopIteration as stop:
        return stop.value


async def run_async(protocol: Protocol, run: Any) -> list[ScoredRows]:
    """Drive `protocol`, awaiting `run(batch) -> outputs` for each batch (the server)."""
    try:
        batch = next(protocol)
        while True:
            batch = protocol.send(await run(batch))
    except StopIteration as stop:
        return stop.value


def corrected_words_problem(vllm_config: Any, field: str = "word_probability") -> str | None:
    """Why this engine cannot compute corrected word probabilities, as the message of the
    request's error, or None where it can: they need the word-boundary masses that this
    package's patch computes in the engine, on V1 (`vllm_loglik.target_logprobs`) or on V2
    (`vllm_loglik.v2_scoring`); vLLM's own path would give numbers without the correction,
    which are never passed off as corrected."""
    why = runner_of(vllm_config).words_problem
    if why is None:
        return None
    return (
        f"{field} 'corrected' needs the word-boundary masses that vllm-loglik computes in the "
        f"engine, which this engine does not compute ({why}). Ask for word_probability "
        "'tokens' (the plain sum of each word's tokens), or serve with a vLLM whose code "
        "vllm-loglik was verified on (vllm-loglik fingerprints lists them)"
    )


def fast_paths(vllm_config: Any) -> list[str]:
    """What the start-up line (`vllm_loglik.reliance.report`) says of this engine: its model
    runner, whether each fast path is on and why one is off, whether LoRA requests take turns."""
    lines = runner_of(vllm_config).lines(vllm_config.cache_config.enable_prefix_caching)
    if getattr(vllm_config, "lora_config", None) is not None:
        turns = lora_mixing_unsafe(vllm_config)
        lines.append("LoRA and base-model requests " + ("take turns" if turns else "share steps"))
    return lines


def lora_mixing_unsafe(vllm_config: Any) -> bool:
    """Whether this engine scores a base-model request wrongly when an adapter's request shares
    its step: vLLM 0.32's CPU LoRA kernels (`vllm/lora/ops/torch_ops/lora_ops.py`) select the
    adapter of each token with `weights[index]`, and the base model's index is -1, which picks
    the last adapter slot instead of none. vLLM 0.33's mask it, and GPU kernels skip it. Where
    this holds, the callers keep base-model and adapter requests out of the engine at the same
    time. The kernels' code decides (`LORA_RELIES_ON`): those of a version in `LORA_MASKS_BASE`
    mix safely; 0.32's, or any code not verified, take turns (slower, never wrong)."""
    if getattr(vllm_config, "lora_config", None) is None:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    return checked(LORA_RELIES_ON).version not in LORA_MASKS_BASE

"""The plugin's Prometheus metrics, on vLLM's own `/metrics`.

vLLM serves `/metrics` from prometheus_client's default registry, or, with more than one
API-server process (`--api-server-count N`), from a registry that collects every process's
values through `PROMETHEUS_MULTIPROC_DIR`, which `vllm serve` sets before it starts them
(`vllm/v1/metrics/prometheus.py`). The metrics here are prometheus_client's own Counter and
Histogram, made in each API-server process when the plugin's routes are attached, so they join
whichever of the two vLLM uses: in multi-process mode their values go to that directory, and
`/metrics` on any process shows the sums over all of them.

Names start with `vllm_loglik:` (vLLM's own start with `vllm:`). Only requests that carry the
`loglikelihood` field and reach the plugin's handler are counted, and, in the `echo_` metrics,
the echo requests that echo acceleration answers (`echo.py`); a body that FastAPI refuses
before that (not JSON, a wrong type) is in vLLM's own `http_requests_total`.

| metric | labels | what it counts |
| --- | --- | --- |
| `vllm_loglik:requests_total` | `endpoint`, `mode`, `outcome`, `model` | scoring requests answered |
| `vllm_loglik:request_duration_seconds` | `endpoint`, `mode` | their latency (histogram) |
| `vllm_loglik:scored_tokens_total` | `model` | tokens whose logprobs were returned |
| `vllm_loglik:prompt_tokens_total` | `model` | prompt tokens of scoring requests sent to the engine |
| `vllm_loglik:warmups_total` | `model` | shared contexts prefilled once into the prefix cache |
| `vllm_loglik:warmup_tokens_total` | `model` | their prompt tokens |
| `vllm_loglik:cached_tokens_total` | `model` | prompt tokens that scoring requests read from the prefix cache |
| `vllm_loglik:echo_requests_total` | `model` | echo requests that only score, answered with echo acceleration (`echo.py`) |
| `vllm_loglik:echo_prompts_total` | `model` | their prompts |
| `vllm_loglik:echo_shared_tokens_total` | `model` | prompt tokens whose logprobs they read from prefixes that earlier echo prompts computed |
| `vllm_loglik:fallbacks_total` | `reason` | cached outputs that could not be read, scored again without the cache; scoring requests whose prompt logprobs the engine computes on vLLM's own path (`prompt_logprobs_path`) |

`endpoint` is `completions`, `chat` or `sequence_logprobs` (TRL's route, `teacher.py`);
`mode` is `prompt` (`loglikelihood: true`, or no scope), `continuations`, `rolling` or
`last_message` (`sequences` on TRL's route); `outcome` is `200`, `4xx`, `5xx` or `cancelled` (the client left first); `model` is the request's `model` when the
server serves that name (the base model or an adapter), else `-` (so a client's invented names
never become labels). `reason` is one of `vllm_loglik.engine_output.UNREADABLE_REASONS`, or
`prompt_logprobs_path`: a scoring request that the engine computes with vLLM's own prompt
logprobs, because the target-only path (`vllm_loglik.target_logprobs`) does not apply to it (the
server logs why at start-up: turned off, vLLM code that differs from every verified version's,
the V2 model runner, a logit `logprobs_mode`); `echo_path`: an echo request that only scores,
left to vLLM because the installed vLLM's code of what echo acceleration relies on differs;
`cache_reads`: a scoring request computed without prefix-cache reads because the installed
vLLM's output layouts are not verified (`vllm_loglik.fingerprints`). Every reason is exported from the start, at 0. `cached_scored_position` is expected now and then:
the same context and continuation scored again while its KV blocks are still cached, where a
block boundary falls inside the continuation (the cache then covers a scored position, whose
logprob the engine does not compute). `layout`, `missing_entry` and `wrong_token` stay at 0 on
a model runner whose output the plugin reads; a count there means a layout that it does not
read: the numbers are still right, the speed-up of shared contexts is lost, and we want the
issue report.
"""

from __future__ import annotations

from typing import Any

from ..engine_output import FALLBACK_REASON as CACHE_READS_FALLBACK
from ..engine_output import UNREADABLE_REASONS
from ..engine_requests import ProtocolStats
from ..target_logprobs import FALLBACK_REASON
from .echo import FALLBACK_REASON as ECHO_FALLBACK

#: Every `reason` of `fallbacks_total`, exported at 0 from the start.
FALLBACK_REASONS = (*UNREADABLE_REASONS, FALLBACK_REASON, ECHO_FALLBACK, CACHE_READS_FALLBACK)

#: Latency buckets (seconds): a scoring request takes from milliseconds (one short prompt) to
#: minutes (a long rolling document, or many continuations on a busy server).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The plugin's metrics in one API-server process (see the module docstring)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "vllm_loglik:requests", "Scoring requests answered, by endpoint, mode, outcome "
            "(200, 4xx, 5xx) and model (the base model or an adapter; - for a name not served).",
            ["endpoint", "mode", "outcome", "model"],
        )  # fmt: skip
        self.duration = Histogram(
            "vllm_loglik:request_duration_seconds", "Latency of scoring requests.",
            ["endpoint", "mode"], buckets=BUCKETS,
        )  # fmt: skip
        self.scored_tokens = Counter(
            "vllm_loglik:scored_tokens", "Tokens whose logprobs scoring requests returned.",
            ["model"],
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm_loglik:prompt_tokens", "Prompt tokens of the engine requests that scored "
            "(warm-ups not included; scoring again after a fallback included).", ["model"],
        )  # fmt: skip
        self.warmups = Counter(
            "vllm_loglik:warmups", "Shared contexts prefilled once into the prefix cache, to be "
            "read by their continuations.", ["model"],
        )  # fmt: skip
        self.warmup_tokens = Counter(
            "vllm_loglik:warmup_tokens", "Prompt tokens of the shared-context warm-ups.", ["model"]
        )
        self.cached_tokens = Counter(
            "vllm_loglik:cached_tokens", "Prompt tokens that scoring requests read from the "
            "prefix cache instead of computing them.", ["model"],
        )  # fmt: skip
        self.fallbacks = Counter(
            "vllm_loglik:fallbacks", "Cached outputs that could not be read and were scored "
            "again without the cache, by reason. layout, missing_entry and wrong_token stay at "
            "0 on a healthy server: a count there means a layout of prompt logprobs that the "
            "plugin does not read (numbers stay right, the shared-context speed-up is lost); "
            "please report it. cached_scored_position: a prompt scored again while its blocks "
            "were cached. prompt_logprobs_path: scoring requests computed on vLLM's own prompt "
            "logprobs path, not the target-only one.", ["reason"],
        )  # fmt: skip
        self.echo_requests = Counter(
            "vllm_loglik:echo_requests", "Echo requests that only score (echo with logprobs, "
            "max_tokens 0 or 1), answered with echo acceleration.", ["model"],
        )  # fmt: skip
        self.echo_prompts = Counter(
            "vllm_loglik:echo_prompts", "Prompts of accelerated echo requests.", ["model"]
        )
        self.echo_shared_tokens = Counter(
            "vllm_loglik:echo_shared_tokens", "Prompt tokens of accelerated echo requests whose "
            "logprobs were read from a prefix that an earlier echo prompt computed.", ["model"],
        )  # fmt: skip
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)  # exported at 0 from the start

    def engine_work(self, model: str, stats: ProtocolStats, scored_tokens: int) -> None:
        """Count what one request's scoring protocol sent to the engine and read."""
        self.scored_tokens.labels(model).inc(scored_tokens)
        self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        if stats.warmups:
            self.warmups.labels(model).inc(stats.warmups)
            self.warmup_tokens.labels(model).inc(stats.warmup_tokens)
        if stats.cached_tokens:
            self.cached_tokens.labels(model).inc(stats.cached_tokens)
        for reason, count in stats.fallbacks.items():
            self.fallbacks.labels(reason).inc(count)

    def echo_prompt(self, model: str, shared_tokens: int, fallback: str | None) -> None:
        self.echo_prompts.labels(model).inc()
        if shared_tokens:
            self.echo_shared_tokens.labels(model).inc(shared_tokens)
        if fallback is not None:
            self.fallbacks.labels(fallback).inc()

    def answered(
        self, endpoint: str, mode: str, status: int | str, model: str, seconds: float
    ) -> None:
        """Count a scoring request: `status` is its HTTP status, or `"cancelled"` (the client
        left before the answer)."""
        outcome = outcome_label(status)
        self.requests.labels(endpoint, mode, outcome, model).inc()
        self.duration.labels(endpoint, mode).observe(seconds)


def outcome_label(status: int | str) -> str:
    """The `outcome` label: `200`, `4xx`, `5xx`, or `cancelled`."""
    if status == "cancelled":
        return "cancelled"
    code = int(status)
    return "200" if code < 400 else "4xx" if code < 500 else "5xx"


_metrics: Metrics | None = None


def metrics() -> Metrics:
    """This process's metrics, made on first use (prometheus_client allows one of each name
    per registry)."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def mode_of(options: Any) -> str:
    """The `mode` label of a request's `loglikelihood` options (`True` or the options object)."""
    if options is True or options is None:
        return "prompt"
    if getattr(options, "continuations", None):
        return "continuations"
    return getattr(options, "scope", None) or "prompt"


def model_label(model: Any, serving_models: Any) -> str:
    """The `model` label: the request's `model` if the server serves that name (no `model` is
    the base model, by its first served name), else `-`."""
    if serving_models is None:
        return "-"
    if not model:
        return serving_models.base_model_paths[0].name
    if isinstance(model, str) and (
        serving_models.is_base_model(model) or model in serving_models.lora_requests
    ):
        return model
    return "-"

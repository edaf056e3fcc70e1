"""The model runner an engine runs, and how this package scores on it: one small interface,
chosen once per engine and named in the start-up line.

vLLM has had two model runners, which compute prompt logprobs in code of their own:

| runner | where | prompt logprobs | shared contexts | corrected word scores |
| --- | --- | --- | --- | --- |
| `V1` | the CPU build (vLLM 0.32, 0.33), GPUs with `VLLM_USE_V2_MODEL_RUNNER=0` | the target-only patch (`vllm_loglik.target_logprobs`) | warm-up, then cache reads with `detokenize=False`, read in V1's layout (`vllm_loglik.engine_output`) | two more columns of the patch |
| `V2` | every vLLM from 0.34 on, on a GPU or the standalone CPU runner | V2's own (`prompt_logprobs`, `prompt_logprob_start`) | warm-up, then cache reads up to `prompt_logprob_start` (vLLM's hit limit) | `prompt_logprob_token_ids` columns filled by `vllm_loglik.v2_scoring` |
| `V2 without scoring fields` | GPUs on vLLM 0.32, 0.33 | V2's own, counted as a fallback | cache reads in V2's layout | none |

`runner_of(vllm_config)` decides which applies from the configuration and the installed vLLM's
code (each module's `RELIES_ON`, `vllm_loglik.reliance`), once per engine. The offline API, the
server, the batch CLI and the lm-eval models ask it what to send (`scoring_params`) and what is
off and why; none of them asks which runner it is on. `install` is the `vllm.general_plugins`
entry point: it puts each runner's patch in place in the engine's worker processes (each patch
checks its own code and stays out where the runner is not the one running).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import target_logprobs, v2_scoring
from .engine_marks import MARK, TEMPERATURE, WORDS
from .engine_output import RELIES_ON as OUTPUT_LAYOUT
from .reliance import checked


@dataclass(frozen=True)
class Runner:
    """How this package scores on one engine."""

    #: `V1`, `V2`, or `V2 without scoring fields`: named in the start-up line.
    name: str
    #: Whether the engine takes V2's scoring fields (`vllm_loglik.v2_scoring`).
    fields: bool
    #: Why scoring requests take vLLM's own prompt-logprob path where a faster one exists for
    #: this runner (each then counted on `fallbacks_total{reason="prompt_logprobs_path"}`).
    prompt_logprobs_problem: str | None
    #: Why the prefix cache is not read although it is on, if so.
    cache_reads_problem: str | None
    #: Why the engine cannot compute word-boundary masses, if so.
    words_problem: str | None
    #: Why the engine cannot compute prompt logprobs at a temperature (`engine_marks.TEMPERATURE`;
    #: vLLM's own are raw, whatever the temperature), if so: the runner's patch does it.
    temperature_problem: str | None = None

    @property
    def word_columns(self) -> int:
        """The prompt-logprob columns that word masses take beyond `top_logprobs` (V1's patch
        puts them there; V2's come as token-id scores), which count against `max_logprobs`."""
        return 0 if self.fields else 2

    def scoring_params(
        self, num_tokens: int, start: int, top_logprobs: int, read_cache: bool, words: bool,
        temperature: float = 1.0,
    ) -> Any:  # fmt: skip
        """The sampling parameters of a scoring request for a span of `num_tokens` prompt tokens
        scored from position `start`: prompt logprobs with `top_logprobs` alternatives, the
        flat container, no detokenizing (required with V1's cache reads: its cached rows are
        unset), cache reads when `read_cache`; with `words`, the word-boundary masses as this
        runner computes them; with a `temperature` other than 1, log softmax(logits / T)
        (the caller has checked `temperature_problem`)."""
        from vllm import SamplingParams

        extra: dict[str, Any] = {MARK: True, WORDS: True} if words else {MARK: True}
        if temperature != 1:
            extra[TEMPERATURE] = float(temperature)
        fields = v2_scoring.scoring_fields(num_tokens, start, words) if self.fields else {}
        k = top_logprobs + self.word_columns if words else top_logprobs
        return SamplingParams(
            max_tokens=1,
            prompt_logprobs=k,
            detokenize=False,
            flat_logprobs=True,  # no dict or Logprob object per position in the front-end
            skip_reading_prefix_cache=not read_cache,
            # The engine's patch for this runner takes the marked requests only.
            extra_args=extra,
            **fields,
        )

    def temperature_refusal(self, temperature: float, field: str = "temperature") -> str | None:
        """Why a request for prompt logprobs at `temperature` (named `field`) cannot be scored
        on this runner, or None: a temperature other than 1 needs its patch."""
        if temperature == 1 or self.temperature_problem is None:
            return None
        return (
            f"{field} other than 1 needs this package's engine patch, which is off here "
            f"({self.temperature_problem}); vLLM's own prompt logprobs ignore it"
        )

    def words_refusal(
        self, top_logprobs: int, max_logprobs: int, field: str = "top_logprobs"
    ) -> str | None:
        """Why corrected words with `top_logprobs` alternatives (named `field`) cannot be scored
        on an engine whose cap on logprobs per position is `max_logprobs`, or None: on V1 the
        word masses take two prompt-logprob columns beyond the alternatives."""
        extra = self.word_columns
        if not extra or top_logprobs + extra <= max_logprobs:
            return None
        return (
            f"{field} is {top_logprobs}; with corrected words the engine computes {extra} more "
            f"prompt logprobs per position, and its max_logprobs is {max_logprobs}: at most "
            f"{max(max_logprobs - extra, 0)} here (or raise the engine's max_logprobs, "
            "--max-logprobs on the server)"
        )

    def with_start(self, params: Any, start: int) -> Any:
        """`params` that score the prompt from position `start` on, on a runner with V2's
        scoring fields (which then reads the prefix cache up to there); as they are elsewhere."""
        if not self.fields:
            return params
        params = params.clone()
        params.prompt_logprob_start = start - 1
        return params

    def lines(self, prefix_caching: bool) -> list[str]:
        """What the start-up line says of this runner's paths: on, or off and why."""
        return [
            f"model runner: {self.name}",
            path_line("fast prompt logprobs", self.prompt_logprobs_problem),
            path_line("prefix-cache reads", self.cache_reads_problem if prefix_caching
                      else "prefix caching is off"),
            path_line("corrected word scores", self.words_problem),
            path_line("prompt logprobs at a temperature", self.temperature_problem),
        ]  # fmt: skip


def path_line(name: str, problem: str | None) -> str:
    """A fast path in the start-up line: `NAME: on`, or `NAME: off (why)`."""
    return f"{name}: on" if problem is None else f"{name}: off ({problem})"


_runners: dict[int, tuple[Any, Runner]] = {}


def runner_of(vllm_config: Any) -> Runner:
    """The runner of the engine with this configuration (see the module docstring)."""
    known = _runners.get(id(vllm_config))
    if known is not None and known[0] is vllm_config:
        return known[1]
    runner = _choose(vllm_config)
    _runners[id(vllm_config)] = (vllm_config, runner)
    return runner


def _choose(vllm_config: Any) -> Runner:
    caching = vllm_config.cache_config.enable_prefix_caching
    if v2_scoring.runs_v2(vllm_config):
        why = v2_scoring.problem(vllm_config)
        if why is None:
            patch = v2_scoring.words_problem(vllm_config)
            return Runner("V2", True, None, None, patch, patch)
    layout = checked(OUTPUT_LAYOUT).reason() if caching else None
    if not v2_scoring.runs_v2(vllm_config):
        path = target_logprobs.problem(vllm_config)
        return Runner("V1", False, path, layout, path, path)
    return Runner(
        "V2 without scoring fields", False,
        f"V2 without its scoring fields computes logprobs for every prompt position ({why})",
        layout, f"V2 without its scoring fields ({why})", f"V2 without its scoring fields ({why})",
    )  # fmt: skip


def install() -> None:
    """The `vllm.general_plugins` entry point, loaded by vLLM in every process: each runner's
    patch of the worker (V1's prompt-logprob step, V2's token-id scores), where its code is
    the verified one."""
    target_logprobs.install()
    v2_scoring.install()

"""Many scoring protocols in flight at once on one `vllm.LLM`, driven by its engine's `step()` loop.

`EngineStream` runs `vllm_loglik.engine_requests` protocols side by side: each protocol's next
batch of requests is added to the engine as soon as its previous batch is done, so a shared
context is warmed up and then read by its continuations while other protocols keep the engine
busy. A caller keeps about a token budget in flight and feeds more protocols as others finish.
The batch CLI (`vllm_loglik.batch`) feeds it input lines, and lm-eval's in-process model
(`vllm_loglik.harness_offline`) feeds it groups of spans through `score_groups`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .runners import runner_of
from .engine_requests import (
    EngineRequest,
    Protocol,
    lora_scoring_problem,
    prefix_block_size,
    score_spans,
)
from .scoring import score_totals
from .spans import Span

#: Prompt tokens in flight in the engine before more work is added: enough to keep it busy.
DEFAULT_BUDGET_TOKENS = 65536

_calls = itertools.count()


class EngineStream:
    """Runs many `engine_requests` protocols at once on an `LLM`'s engine, with its `step()`
    loop: each protocol's batch of requests is added as soon as the previous one is done."""

    def __init__(self, llm: Any):
        from vllm.inputs import TokensPrompt

        self.TokensPrompt = TokensPrompt
        self.engine = llm.llm_engine
        problem = lora_scoring_problem(self.engine.vllm_config)
        if problem is not None:
            raise ValueError(problem)
        self.block_size = prefix_block_size(self.engine.vllm_config)
        self.runner = runner_of(self.engine.vllm_config)
        self.active: dict[int, _Running] = {}
        self.owner: dict[str, tuple[int, int]] = {}  # request id -> (key, slot)
        self.tokens_in_flight = 0

    def submit(
        self, key: int, protocol: Protocol, tokens: int, lora_request: Any = None
    ) -> list[Any] | None:
        """Start `protocol`, every request of it under `lora_request` (a LoRA adapter, or None
        for the base model: the prefix cache keys blocks by adapter, so a protocol's warm-up
        and its scoring must run under the same one); returns its rows at once if it needs
        no engine request."""
        running = _Running(protocol, tokens, lora_request)
        try:
            batch = next(protocol)
        except StopIteration as stop:
            return stop.value
        self._add(key, running, batch)
        self.active[key] = running
        self.tokens_in_flight += tokens
        return None

    def _add(self, key: int, running: _Running, batch: list[EngineRequest]) -> None:
        running.outputs = [None] * len(batch)
        running.left = len(batch)
        added = []
        try:
            for slot, request in enumerate(batch):
                prompt = self.TokensPrompt(prompt_token_ids=request.prompt_token_ids)
                # Outputs carry the id given here (the engine adds a suffix to its own).
                self.engine.add_request(
                    request.request_id, prompt, request.params, lora_request=running.lora_request
                )
                self.owner[request.request_id] = (key, slot)
                added.append(request.request_id)
        except Exception:  # the engine refused a request (e.g. a token id out of range)
            if added:
                self.engine.abort_request(added)
            for rid in added:
                del self.owner[rid]
            raise

    def step(self) -> list[tuple[int, list[Any]]]:
        """One engine step; returns `(key, rows)` of each protocol that finished."""
        done = []
        for out in self.engine.step():
            if not out.finished:
                continue
            key, slot = self.owner.pop(out.request_id)
            running = self.active[key]
            running.outputs[slot] = out
            running.left -= 1
            if running.left:
                continue
            try:
                batch = running.protocol.send(running.outputs)
                self._add(key, running, batch)
            except StopIteration as stop:
                self._end(key, running)
                done.append((key, stop.value))
            except Exception as e:  # an output that cannot be read: this line's error
                self._end(key, running)
                done.append((key, e))
        return done

    def _end(self, key: int, running: _Running) -> None:
        del self.active[key]
        self.tokens_in_flight -= running.tokens

    def abort(self) -> None:
        if self.owner:
            self.engine.abort_request(list(self.owner))
        self.owner.clear()
        self.active.clear()


@dataclass
class _Running:
    protocol: Protocol
    tokens: int
    lora_request: Any = None
    outputs: list[Any] = field(default_factory=list)
    left: int = 0


def score_groups(
    llm: Any,
    groups: Sequence[Sequence[Span]],
    *,
    lora_request: Any = None,
    budget_tokens: int = DEFAULT_BUDGET_TOKENS,
    max_spans: int | None = None,
    on_done: Callable[[int, list[tuple[float, bool]]], None] | None = None,
) -> list[list[tuple[float, bool]]]:
    """`(logprob, is_greedy)` of every span of every group, computed on `llm`'s engine.

    A group is the spans that share a context (the continuations of one context, or the
    windows of one rolling text): it is one protocol, so a context that fills a KV block is
    computed once (see `vllm_loglik.engine_requests`). Groups are added in order while fewer
    than `budget_tokens` prompt tokens (and, if given, fewer than `max_spans` spans) are in
    flight; at least one group always is. `on_done(i, results)` is called as group `i`
    finishes. `logprob` is the sum of the scored tokens' logprobs and `is_greedy` whether
    each is the argmax (rank 1). An engine output that cannot be read raises
    `EngineOutputError`; a prompt that the engine refuses raises its `ValueError`.
    """
    stream = EngineStream(llm)
    call = next(_calls)
    results: list[list[tuple[float, bool]] | None] = [None] * len(groups)
    spans_in_flight: dict[int, int] = {}

    def done(i: int, rows: list[Any] | Exception) -> None:
        spans_in_flight.pop(i, None)
        if isinstance(rows, Exception):
            raise rows
        results[i] = [score_totals(span, r) for span, r in zip(groups[i], rows, strict=True)]
        if on_done is not None:
            on_done(i, results[i])

    def room(i: int) -> bool:
        if not stream.active:
            return True
        if stream.tokens_in_flight >= budget_tokens:
            return False
        return max_spans is None or sum(spans_in_flight.values()) + len(groups[i]) <= max_spans

    try:
        i = 0
        while i < len(groups) or stream.active:
            while i < len(groups) and room(i):
                group = groups[i]
                tokens = sum(len(span.prompt_token_ids) for span in group)
                protocol = score_spans(
                    group, 0, stream.block_size, f"lm{call}-{i}", runner=stream.runner
                )
                spans_in_flight[i] = len(group)
                rows = stream.submit(i, protocol, tokens, lora_request)
                if rows is not None:
                    done(i, rows)
                i += 1
            for key, rows in stream.step() if stream.active else []:
                done(key, rows)
    finally:
        stream.abort()
    return results  # type: ignore[return-value]  # every group is done

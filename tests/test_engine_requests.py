"""The protocol of engine requests that the offline API and the server share, on a fake engine
that keeps a prefix cache of whole blocks and returns either model runner's layout."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from vllm.logprobs import FlatLogprobs, Logprob

from vllm_loglik.engine_output import EngineOutputError
from vllm_loglik.engine_requests import run_sync, score_spans, shared_prefix
from vllm_loglik.spans import Span

BLOCK = 4


def logprob(ids: list[int], pos: int) -> float:
    """The fake model's log P(ids[pos] | ids[:pos]): it depends on the whole prefix."""
    return -((sum(ids[: pos + 1]) * 7 + pos) % 11) / 3 - 0.01


@dataclass
class Output:
    prompt_logprobs: object
    num_cached_tokens: int
    request_id: str


class FakeEngine:
    """Caches the full blocks of every prompt it computed; a request that reads the cache gets
    the cached rows unset (V1) or left out (V2), as vLLM does."""

    def __init__(self, layout: str = "v1", broken: set[str] = frozenset()):
        self.layout = layout
        self.cache: set[tuple[int, ...]] = set()
        self.batches: list[list] = []
        self.broken = broken  # request-id suffixes whose output is unreadable

    def run(self, batch):
        self.batches.append(batch)
        outputs = []
        for request in batch:
            ids = request.prompt_token_ids
            cached = 0
            if not request.params.skip_reading_prefix_cache:
                while cached + BLOCK < len(ids) and tuple(ids[: cached + BLOCK]) in self.cache:
                    cached += BLOCK
            for end in range(BLOCK, len(ids) + 1, BLOCK):
                self.cache.add(tuple(ids[:end]))
            outputs.append(Output(self.logprobs(request, ids, cached), cached, request.request_id))
        return outputs

    def logprobs(self, request, ids, cached):
        if request.params.prompt_logprobs is None:
            return None
        if any(request.request_id.endswith(s) for s in self.broken):
            return [None] * 2
        rows = [None] + [
            {999: Logprob(0.0, 1)} if p <= cached else {ids[p]: Logprob(logprob(ids, p), 1)}
            for p in range(1, len(ids))
        ]
        if self.layout == "v2" and cached:
            rows = [None] + rows[cached + 1 :]
        flat = FlatLogprobs()
        for row in rows:
            flat.append(row)
        return flat  # the protocol asks for flat_logprobs=True


CONTEXT = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # 10 tokens: two full blocks and a half


def pair(*continuation: int) -> Span:
    return Span(CONTEXT + list(continuation), len(CONTEXT))


def expected(span: Span) -> list[float]:
    ids = span.prompt_token_ids
    return [logprob(ids, p) for p in range(span.start, len(ids))]


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_a_shared_context_is_warmed_once_and_read_from_the_cache(layout):
    engine = FakeEngine(layout)
    spans = [pair(20, 21), pair(22), pair(23, 24, 25)]
    rows = run_sync(score_spans(spans, 0, BLOCK, "r"), engine.run)
    assert [r.logprobs for r in rows] == [expected(s) for s in spans]
    warm, scoring = engine.batches  # no third batch: nothing was scored again
    assert [r.prompt_token_ids for r in warm] == [CONTEXT[:-1]]
    assert warm[0].params.prompt_logprobs is None and warm[0].request_id == "r-prefix-0"
    assert all(not r.params.skip_reading_prefix_cache for r in scoring)
    assert all(r.params.flat_logprobs and not r.params.detokenize for r in scoring)


def test_lone_spans_read_the_cache_only_when_asked():
    engine = FakeEngine()
    rows = run_sync(score_spans([pair(20)], 2, BLOCK, "r"), engine.run)
    assert rows[0].logprobs == expected(pair(20))
    (scoring,) = engine.batches
    assert scoring[0].params.skip_reading_prefix_cache and scoring[0].params.prompt_logprobs == 2

    engine = FakeEngine()
    run_sync(score_spans([pair(20)], 0, BLOCK, "r", warm_single=True), engine.run)
    assert len(engine.batches) == 2  # the server warms a lone continuation's context


def test_no_warm_up_without_prefix_caching_or_a_full_block():
    engine = FakeEngine()
    run_sync(score_spans([pair(20), pair(21)], 0, None, "r"), engine.run)
    assert len(engine.batches) == 1
    short = [Span([1, 5, 6, 20], 3), Span([1, 5, 6, 21], 3)]  # the context fills no block
    assert shared_prefix(short, BLOCK) is None
    engine = FakeEngine()
    rows = run_sync(score_spans(short, 0, BLOCK, "r"), engine.run)
    assert len(engine.batches) == 1 and [r.logprobs for r in rows] == [expected(s) for s in short]


def test_different_contexts_are_different_groups():
    other = Span([1, 5, 6, 7, 8, 9, 10, 11, 99, 13, 30], 10)
    spans = [pair(20), other, pair(21), Span(list(other.prompt_token_ids[:-1]) + [31], 10)]
    engine = FakeEngine()
    rows = run_sync(score_spans(spans, 0, BLOCK, "r"), engine.run)
    assert [r.logprobs for r in rows] == [expected(s) for s in spans]
    warm, _ = engine.batches
    assert sorted(r.prompt_token_ids for r in warm) == sorted(
        [CONTEXT[:-1], other.prompt_token_ids[:9]]
    )


def test_a_scored_position_in_the_cache_is_scored_again_without_it():
    engine = FakeEngine()
    span = pair(20, 21, 22)  # 13 tokens, scored from position 10
    run_sync(score_spans([span], 0, BLOCK, "first"), engine.run)  # caches 3 blocks of it
    rows = run_sync(score_spans([span, span], 0, BLOCK, "again"), engine.run)
    # Both read 12 cached tokens, past the first scored position: so both are scored again.
    assert [r.logprobs for r in rows] == [expected(span)] * 2
    warm, scoring, full = engine.batches[1:]
    assert [r.request_id for r in full] == ["again-0-full", "again-1-full"]
    assert all(r.params.skip_reading_prefix_cache for r in full)


def test_unreadable_cached_output_falls_back_and_an_unreadable_full_one_is_a_fault():
    engine = FakeEngine(broken={"r-1"})
    rows = run_sync(score_spans([pair(20), pair(21)], 0, BLOCK, "r"), engine.run)
    assert [r.logprobs for r in rows] == [expected(pair(20)), expected(pair(21))]
    assert [r.request_id for r in engine.batches[-1]] == ["r-1-full"]

    engine = FakeEngine(broken={"r-1", "r-1-full"})
    with pytest.raises(EngineOutputError, match="engine request r-1-full"):
        run_sync(score_spans([pair(20), pair(21)], 0, BLOCK, "r"), engine.run)
    engine = FakeEngine(broken={"r-0"})
    with pytest.raises(EngineOutputError, match="engine request r-0"):
        run_sync(score_spans([pair(20)], 0, BLOCK, "r"), engine.run)  # uncached: no retry

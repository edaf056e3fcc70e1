"""Reading prompt logprobs in the layouts of both of vLLM's model runners, on hand-made outputs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vllm_loglik.engine_output import EngineOutputError, require_span_logprobs, span_logprobs
from vllm_loglik.spans import Span


@dataclass
class LP:
    logprob: float
    rank: int = 1


IDS = [0, 11, 12, 13, 14, 15, 16, 17]  # 8 prompt tokens
GARBAGE = {999: LP(0.0)}  # what V1 leaves in a cached row: whatever the buffer held


def entry(pos: int) -> dict[int, LP]:
    """The entry of position `pos`: the prompt's token, and one alternative."""
    return {IDS[pos]: LP(-float(pos)), 3: LP(-0.5)}


def v1(cached: int) -> list:
    """V1 (`gpu_model_runner.py`): a row per position, the cached ones unset."""
    return [None] + [GARBAGE if p <= cached else entry(p) for p in range(1, len(IDS))]


def v2(cached: int) -> list:
    """V2 (`gpu/sample/prompt_logprob.py`): `[None]` and the computed rows only."""
    return [None] + [entry(p) for p in range(cached + 1, len(IDS))]


@pytest.mark.parametrize("layout", [v1, v2])
@pytest.mark.parametrize("cached", [0, 1, 3, 5])
def test_both_layouts_give_the_scored_entries(layout, cached):
    span = Span(IDS, 6)
    got = span_logprobs(layout(cached), cached, span)
    assert got == [entry(6), entry(7)]


def test_without_a_cache_hit_both_layouts_are_the_same():
    assert v1(0) == v2(0)
    assert span_logprobs(v1(0), None, Span(IDS, 1)) == [entry(p) for p in range(1, 8)]


@pytest.mark.parametrize("layout", [v1, v2])
def test_a_cache_hit_that_reaches_a_scored_position_is_unreadable(layout):
    # Position 4's row predicts token 4 from the tokens before it; with 4 tokens cached it
    # was never computed.
    assert span_logprobs(layout(4), 4, Span(IDS, 4)) is None
    assert span_logprobs(layout(3), 3, Span(IDS, 4)) == [entry(p) for p in range(4, 8)]


def test_lengths_of_neither_layout_are_unreadable():
    span = Span(IDS, 6)
    assert span_logprobs(v2(3), 2, span) is None  # V2 length, another cache count
    assert span_logprobs(v2(3)[:-1], 3, span) is None
    assert span_logprobs(v1(0) + [entry(7)], 0, span) is None
    assert span_logprobs([None], 0, span) is None
    assert span_logprobs(None, 0, span) is None
    assert span_logprobs(v1(0), -1, span) is None


def test_missing_or_wrong_entries_are_unreadable():
    span = Span(IDS, 5)
    broken = v1(0)
    broken[6] = None
    assert span_logprobs(broken, 0, span) is None
    broken[6] = {}  # FlatLogprobs reads an empty position as {}
    assert span_logprobs(broken, 0, span) is None
    broken[6] = {3: LP(-0.5)}  # no entry for the prompt's own token
    assert span_logprobs(broken, 0, span) is None
    # V1's unset rows are never read: only the scored positions are.
    assert span_logprobs(v1(4), 4, span) == [entry(5), entry(6), entry(7)]


def test_require_raises_an_engine_output_error_naming_the_request():
    with pytest.raises(EngineOutputError, match="engine request req-7: cannot read"):
        require_span_logprobs(v2(3), 0, Span(IDS, 6), "req-7")
    assert isinstance(EngineOutputError("x"), RuntimeError)
    assert not isinstance(EngineOutputError("x"), ValueError)  # never a client's 400

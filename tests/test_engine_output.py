"""Reading prompt logprobs in the layouts of both of vLLM's model runners, on hand-made outputs,
in both of vLLM's containers (a list of dicts, and `FlatLogprobs`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from vllm.logprobs import FlatLogprobs, Logprob

from vllm_loglik.engine_output import (
    EngineOutputError,
    ScoredRows,
    require_span_logprobs,
    span_logprobs,
)
from vllm_loglik.spans import Span


@dataclass
class LP:
    logprob: float
    rank: int = 1


def flat(rows: list) -> FlatLogprobs:
    """The same positions in vLLM's flat container, as `flat_logprobs=True` returns them: each
    position's prompt token first, then the alternatives."""
    out = FlatLogprobs()
    for row in rows:
        out.append(None if row is None else {t: Logprob(lp.logprob, lp.rank) for t, lp in row.items()})
    return out


def rows(*positions: int) -> ScoredRows:
    """The `ScoredRows` of `entry(p)` for these positions, without alternatives."""
    return ScoredRows([-float(p) for p in positions], [1] * len(positions))


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


CONTAINERS = [pytest.param(list, id="dicts"), pytest.param(flat, id="flat")]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("layout", [v1, v2])
@pytest.mark.parametrize("cached", [0, 1, 3, 5])
def test_both_layouts_give_the_scored_entries(container, layout, cached):
    span = Span(IDS, 6)
    assert span_logprobs(container(layout(cached)), cached, span) == rows(6, 7)
    with_top = span_logprobs(container(layout(cached)), cached, span, top_logprobs=1)
    assert with_top == ScoredRows([-6.0, -7.0], [1, 1], [[(3, -0.5)], [(3, -0.5)]])


@pytest.mark.parametrize("container", CONTAINERS)
def test_without_a_cache_hit_both_layouts_are_the_same(container):
    assert v1(0) == v2(0)
    assert span_logprobs(container(v1(0)), None, Span(IDS, 1)) == rows(*range(1, 8))


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("layout", [v1, v2])
def test_a_cache_hit_that_reaches_a_scored_position_is_unreadable(container, layout):
    # Position 4's row predicts token 4 from the tokens before it; with 4 tokens cached it
    # was never computed.
    assert span_logprobs(container(layout(4)), 4, Span(IDS, 4)) is None
    assert span_logprobs(container(layout(3)), 3, Span(IDS, 4)) == rows(4, 5, 6, 7)


@pytest.mark.parametrize("container", CONTAINERS)
def test_lengths_of_neither_layout_are_unreadable(container):
    span = Span(IDS, 6)
    assert span_logprobs(container(v2(3)), 2, span) is None  # V2 length, another cache count
    assert span_logprobs(container(v2(3)[:-1]), 3, span) is None
    assert span_logprobs(container(v1(0) + [entry(7)]), 0, span) is None
    assert span_logprobs(container([None]), 0, span) is None
    assert span_logprobs(None, 0, span) is None
    assert span_logprobs(container(v1(0)), -1, span) is None


@pytest.mark.parametrize("container", CONTAINERS)
def test_missing_or_wrong_entries_are_unreadable(container):
    span = Span(IDS, 5)
    broken = v1(0)
    broken[6] = None
    assert span_logprobs(container(broken), 0, span) is None
    broken[6] = {}  # FlatLogprobs reads an empty position as {}
    assert span_logprobs(container(broken), 0, span) is None
    broken[6] = {3: LP(-0.5)}  # no entry for the prompt's own token
    assert span_logprobs(container(broken), 0, span) is None
    # V1's unset rows are never read: only the scored positions are.
    assert span_logprobs(container(v1(4)), 4, span) == rows(5, 6, 7)


def test_a_prompt_token_among_the_top_k_reads_the_same_from_both_containers():
    # The engine sends the prompt's token and then the top k; when the prompt's token is one of
    # them, the dict holds it once and the flat container twice.
    ids = [0, 5]
    as_dict = [None, {5: Logprob(-0.1, 1), 6: Logprob(-2.5, 2)}]
    as_flat = FlatLogprobs()
    as_flat.append(None)
    as_flat.append_fast([5, 5, 6], [-0.1, -0.1, -2.5], iter([1, 1, 2]), [None] * 3)
    expected = ScoredRows([-0.1], [1], [[(5, -0.1), (6, -2.5)]])
    assert span_logprobs(as_dict, 0, Span(ids, 1), top_logprobs=2) == expected
    assert span_logprobs(as_flat, 0, Span(ids, 1), top_logprobs=2) == expected


def test_a_flat_position_must_hold_the_prompt_token_first():
    # vLLM puts the prompt's token first and then the top k; the prompt's token appearing only
    # among the alternatives is not a readable position.
    swapped = v1(0)
    swapped[6] = {3: LP(-0.5), IDS[6]: LP(-6.0)}
    assert span_logprobs(flat(swapped), 0, Span(IDS, 5)) is None


def test_require_raises_an_engine_output_error_naming_the_request():
    with pytest.raises(EngineOutputError, match="engine request req-7: cannot read"):
        require_span_logprobs(v2(3), 0, Span(IDS, 6), "req-7")
    assert isinstance(EngineOutputError("x"), RuntimeError)
    assert not isinstance(EngineOutputError("x"), ValueError)  # never a client's 400

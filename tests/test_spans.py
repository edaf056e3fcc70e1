"""Unit tests of the pure core: boundaries, windows and arithmetic, on hand-made inputs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vllm_loglik.engine_output import EngineOutputError, ScoredRows
from vllm_loglik.jobs import Scorer
from vllm_loglik.scoring import score_span, score_tokens
from vllm_loglik.spans import (
    Span,
    check_text,
    get_rolling_token_windows,
    make_disjoint_window,
    move_trailing_whitespace,
    pair_span,
    prompt_span,
    validate_conversation,
)
from vllm_loglik.tokenization import Tokenization


def test_rolling_windows_match_lm_eval_gold():
    # The expected windows of lm-evaluation-harness's own test of this function
    # (test_get_rolling_token_windows_v1).
    gold = [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]
    windows = list(get_rolling_token_windows(list(range(34)), -100, 10, 1))
    assert windows == gold


def test_disjoint_windows_predict_each_token_once():
    tokens = list(range(1000, 1037))
    for max_seq_len in (1, 2, 5, 10, 36, 37, 50):
        windows = [
            make_disjoint_window(w) for w in get_rolling_token_windows(tokens, -1, max_seq_len, 1)
        ]
        predicted = [t for _, pred in windows for t in pred]
        assert predicted == tokens
        for ctx, pred in windows:
            assert len(ctx) + len(pred) <= max_seq_len + 1
            assert len(ctx) >= 1
        assert windows[0][0][0] == -1


def test_rolling_windows_with_context_len_keep_overlap():
    windows = list(get_rolling_token_windows(list(range(10)), -1, 4, 2))
    assert windows[0] == ([-1, 0, 1, 2], [0, 1, 2, 3])
    assert windows[1] == ([2, 3, 4, 5], [4, 5, 6])


@pytest.mark.parametrize(
    ("context", "continuation", "expected"),
    [
        ("Q: A", " B", ("Q: A", " B")),
        ("Q: A ", "B", ("Q: A", " B")),
        ("Q: A \n\t", "B", ("Q: A", " \n\tB")),
        ("   ", "B", ("", "   B")),
        ("", "B", ("", "B")),
    ],
)
def test_trailing_whitespace_moves_to_continuation(context, continuation, expected):
    assert move_trailing_whitespace(context, continuation) == expected


def test_span_rejects_nothing_to_score():
    with pytest.raises(ValueError, match="at least one token"):
        Span([1, 2], 2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        prompt_span([5])
    assert prompt_span([5, 6, 7]).scored_token_ids == [6, 7]


@dataclass
class LP:
    logprob: float
    rank: int


class FakeTokenizer:
    """Enough of a tokenizer for the arithmetic: token i is the letter chr(97 + i)."""

    bos_token_id = 0
    eos_token_id = 1
    all_special_tokens: list[str] = []

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)

    def convert_ids_to_tokens(self, i):
        return chr(97 + i)

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) - 97 for c in text]
        return ([0] if add_special_tokens else []) + ids

    def __len__(self):
        return 64


def test_score_sums_and_greedy_and_top_logprobs():
    span = Span([0, 3, 4, 5], 2)
    lps = [
        None,
        {3: LP(-9.0, 7), 2: LP(-0.1, 1)},
        {4: LP(-0.5, 1), 6: LP(-1.5, 2)},
        {5: LP(-2.0, 3), 7: LP(-0.2, 1), 8: LP(-1.0, 2)},
    ]
    score = score_span(span, lps, Tokenization(FakeTokenizer()), top_logprobs=2)
    assert score.logprob == pytest.approx(-2.5)
    assert score.num_tokens == 2
    assert not score.is_greedy
    assert score.token_ids == [4, 5]
    assert score.text == "ef"
    assert [t.rank for t in score.tokens] == [1, 3]
    assert [a.token_id for a in score.tokens[1].top_logprobs] == [7, 8]
    assert score.tokens[0].top_logprobs[0].token == "e"
    ll, greedy = score
    assert (ll, greedy) == (-2.5, False)

    greedy_score = score_span(Span([0, 3, 4], 2), lps[:3], Tokenization(FakeTokenizer()))
    assert greedy_score.is_greedy and greedy_score.tokens[0].top_logprobs == []


def test_score_rejects_mismatched_logprobs_as_an_engine_fault():
    with pytest.raises(EngineOutputError, match="1 entries"):
        score_span(Span([0, 3], 1), [None], Tokenization(FakeTokenizer()))
    with pytest.raises(EngineOutputError, match="cannot read"):
        score_span(Span([0, 3], 1), [None, {9: LP(-1, 1)}], Tokenization(FakeTokenizer()))
    with pytest.raises(EngineOutputError, match="2 scored entries for 1"):
        score_tokens(Span([0, 3], 1), ScoredRows([-1.0] * 2, [1] * 2), Tokenization(FakeTokenizer()))


def test_scorer_errors_name_the_problem():
    scorer = Scorer(FakeTokenizer(), max_model_len=8)
    with pytest.raises(ValueError, match="continuation must not be empty"):
        scorer.pair("abc", "")
    with pytest.raises(ValueError, match="7 tokens that fit"):
        scorer.pair("abcdef", "gh")
    assert scorer.pair("abcde", "f").spans[0].prompt_token_ids == [0, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="non-empty list of messages"):
        scorer.chat("hello")
    with pytest.raises(ValueError, match=r"conversation\[0\].role"):
        scorer.chat([{"content": "x"}])
    with pytest.raises(ValueError, match=r"conversation\[1\].content"):
        scorer.chat([{"role": "user", "content": "x"}, {"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="rolling text must not be empty"):
        scorer.rolling("")
    with pytest.raises(ValueError, match=r"prompt\[1\] must be a token id"):
        scorer.prompt([1, "a"])
    with pytest.raises(ValueError, match=r"prompt\[2\] is token id 64, outside"):
        scorer.prompt([1, 2, 64])
    with pytest.raises(ValueError, match="string or a list of token ids"):
        scorer.prompt(3)
    # Rolling windows fit the engine: each prompt is at most max_model_len - 1 tokens.
    spans = scorer.rolling("abcdefghijklmnopqrstuvwxyz").spans
    assert all(len(s.prompt_token_ids) <= 7 for s in spans)
    assert [t for s in spans for t in s.scored_token_ids] == list(range(26))


class MergingTokenizer(FakeTokenizer):
    """FakeTokenizer with one BPE merge: "xy" is the single token 50."""

    def encode(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("xy", i):
                ids.append(50)
                i += 2
            else:
                ids.append(ord(text[i]) - 97)
                i += 1
        return ([0] if add_special_tokens else []) + ids


def test_pair_keeps_lm_eval_split_where_the_context_is_a_prefix():
    encoder = Tokenization(MergingTokenizer())
    # The merge is inside the continuation: lm-eval's whole[len(ctx):] as it is.
    span = pair_span(encoder, "ab", "cxy")
    assert span.prompt_token_ids == [0, 0, 1, 2, 50] and span.start == 3


def test_pair_encodes_the_continuation_alone_when_bpe_merges_across_the_boundary():
    encoder = Tokenization(MergingTokenizer())
    # encode("abx") = [0, 0, 1, 23] is not a prefix of encode("abxyz") = [0, 0, 1, 50, 25]:
    # lm-eval would score [25] ("z") and lose "y"; the continuation is scored whole instead.
    span = pair_span(encoder, "abx", "yz")
    assert span.prompt_token_ids == [0, 0, 1, 23, 24, 25] and span.start == 4
    assert span.scored_token_ids == [24, 25]
    # Where the merge swallows the whole continuation, lm-eval's split scores nothing at all.
    span = pair_span(encoder, "x", "y")
    assert span.prompt_token_ids == [0, 23, 24] and span.scored_token_ids == [24]


def test_unencodable_text_is_a_value_error_naming_it():
    encoder = Tokenization(FakeTokenizer())
    with pytest.raises(ValueError, match=r"the continuation is not valid Unicode.*U\+D800"):
        pair_span(encoder, "ab", "c\ud800")
    with pytest.raises(ValueError, match="the context is not valid Unicode"):
        pair_span(encoder, "\udc00", "c")
    with pytest.raises(ValueError, match=r"conversation\[1\].content is not valid Unicode"):
        validate_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "\ud800"}])
    assert check_text("ok 🙂") == "ok 🙂"


def test_compact_finish_gives_the_totals_of_the_full_score():
    scorer = Scorer(FakeTokenizer(), max_model_len=64)
    job = scorer.rolling("abcdefghijklmnopqrstuvwxyz" * 4)  # several windows
    scored = [
        ScoredRows(
            [-0.25 * (t % 3) for t in span.scored_token_ids],
            [1 if t % 5 else 2 for t in span.scored_token_ids],
            [[(1, -9.0)] for _ in span.scored_token_ids],
        )
        for span in job.spans
    ]
    full = scorer.finish(job, scored, top_logprobs=1)
    compact = scorer.finish(job, scored, content=False)
    assert len(job.spans) > 1 and full.num_tokens == 104
    assert (compact.logprob, compact.is_greedy, compact.num_tokens) == (
        pytest.approx(full.logprob),
        full.is_greedy,
        full.num_tokens,
    )
    assert compact.tokens == [] and full.tokens
    assert not full.is_greedy  # some ranks are 2
    with pytest.raises(EngineOutputError, match="scored entries"):
        scorer.finish(job, [ScoredRows([-1.0], [1]) for s in job.spans], content=False)

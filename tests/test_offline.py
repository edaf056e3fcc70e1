"""The offline API on a real vLLM engine, checked against a plain transformers forward pass."""

from __future__ import annotations

import pytest

import vllm_loglik
from vllm_loglik.testing import default_corpus

TOL = 1e-4

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is ", "Paris"),  # trailing space moves to the continuation
    ("Question: How many legs does a spider have? Answer:", " eight."),
    ("", "The quick brown fox"),  # empty context: BOS alone
    ("   ", "spaces only context"),  # whitespace-only context becomes empty
    ("日本語: 東京は", "日本の首都です。"),  # multi-byte, split across tokens
    ("Emoji:", " 🙂 🚀 café ☕"),
    ("Deutsch: Die Straße ist", " schön"),
    ("A", "B"),
    ("The capital of Italy is", " Paris"),  # a single-token continuation
    ("line one\n", "\n\tindented"),
    ("Math:", " 𝔘𝔫𝔦 ∀x ✓"),  # characters the tokenizer never saw: byte tokens
    ("東京は日本の", "首都です。"),  # BPE merges across the boundary (see MERGED)
]


def reference_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4.13's `_encode_pair`, written out on the HF tokenizer, with vLLM's encoding
    (special tokens added) and the prefix token for an empty context; where BPE merges across
    the boundary, the continuation encoded on its own (the README's rule)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [tok.bos_token_id], tok.encode(continuation, add_special_tokens=False)
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    if whole[: len(ctx)] != ctx:
        return ctx, tok.encode(continuation, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


#: Pairs where the demo tokenizer merges tokens across the boundary, so that `encode(context)`
#: is not a prefix of `encode(context + continuation)` (its corpus has such text on purpose).
MERGED = [
    ("東京は日本の", "首都です。"),
    ("北京是中国的", "首都。"),
    ("print(", ")"),
    ("x = foo(", ")"),
    ("Great!", "🙂"),
    ("Hooray!", "🎉🎉"),
]


def test_merges_across_the_boundary_score_every_character(llm, ref):
    tok = ref.tokenizer
    scores = vllm_loglik.loglikelihood(llm, MERGED)
    for (context, continuation), score in zip(MERGED, scores, strict=True):
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        assert whole[: len(ctx)] != ctx, "the tokenizer no longer merges here"
        cont = tok.encode(continuation, add_special_tokens=False)
        # lm-eval's whole[len(ctx):] would lose characters; every one is scored here.
        assert tok.decode(whole[len(ctx) :]) != continuation
        assert_matches(score, ref, ctx + cont, len(ctx))
        assert bytes(b for t in score.tokens for b in t.bytes).decode("utf-8") == continuation
    # Where the prefix holds, lm-eval's split is kept exactly, merges inside the
    # continuation included.
    [score] = vllm_loglik.loglikelihood(llm, [("Thanks", "!🙂")])
    ctx, whole = tok.encode("Thanks"), tok.encode("Thanks!🙂")
    assert whole[: len(ctx)] == ctx and score.token_ids == whole[len(ctx) :]


def assert_matches(score, ref, ids: list[int], start: int):
    ref_lps, ref_greedy = ref.score(ids, start)
    assert score.token_ids == ids[start:]
    assert score.num_tokens == len(ids) - start
    assert len(score.tokens) == len(ref_lps)
    for tok, expected in zip(score.tokens, ref_lps, strict=True):
        assert abs(tok.logprob - expected) <= TOL, (tok, expected)
    assert abs(score.logprob - sum(ref_lps)) <= TOL * len(ref_lps)
    assert score.is_greedy == ref_greedy


def test_pairs_match_transformers(llm, ref):
    scores = vllm_loglik.loglikelihood(llm, PAIRS)
    assert len(scores) == len(PAIRS)
    for (context, continuation), score in zip(PAIRS, scores, strict=True):
        ctx, cont = reference_split(ref.tokenizer, context, continuation)
        assert ctx.count(ref.tokenizer.bos_token_id) == 1
        assert_matches(score, ref, ctx + cont, len(ctx))
    # The boundary rule makes these two the same request.
    assert scores[0].token_ids == scores[1].token_ids
    assert scores[0].logprob == pytest.approx(scores[1].logprob, abs=TOL)
    assert scores[9].num_tokens == 1
    # Token bytes are exact, also where a multi-byte character is split across tokens
    # (token text then shows U+FFFD); together they spell the scored text.
    for score in scores:
        joined = bytes(b for t in score.tokens for b in t.bytes).decode("utf-8")
        assert joined == ref.tokenizer.decode(score.token_ids)
    assert any("\ufffd" in t.token for s in scores for t in s.tokens)
    emoji = bytes(b for t in scores[6].tokens for b in t.bytes).decode("utf-8")
    assert emoji == " 🙂 🚀 café ☕"


def test_is_greedy_true_when_continuation_is_the_argmax(llm, ref):
    # Build continuations from the model's own greedy choice, so is_greedy must be true.
    found_greedy = 0
    for context in ["The capital of France is", "Question: What", "def add(a, b):\n"]:
        ids = ref.tokenizer.encode(context)
        _, argmax = ref.token_logprobs(ids + [0])
        next_id = argmax[-1]
        continuation = ref.tokenizer.decode([next_id])
        (score,) = vllm_loglik.loglikelihood(llm, [(context, continuation)])
        ctx, cont = reference_split(ref.tokenizer, context, continuation)
        assert_matches(score, ref, ctx + cont, len(ctx))
        found_greedy += score.is_greedy
    assert found_greedy >= 1


def test_top_logprobs_match_transformers(llm, ref):
    import torch

    (score,) = vllm_loglik.loglikelihood(
        llm, [("The capital of France is", " Paris, and Rome")], top_logprobs=5
    )
    ctx, cont = reference_split(ref.tokenizer, "The capital of France is", " Paris, and Rome")
    ids = ctx + cont
    with torch.no_grad():
        logits = ref.model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    for offset, tok in enumerate(score.tokens):
        pos = len(ctx) + offset - 1  # logits at pos predict ids[pos + 1]
        values, indices = logprobs[pos].topk(5)
        assert [a.token_id for a in tok.top_logprobs] == indices.tolist()
        for alt, v in zip(tok.top_logprobs, values.tolist(), strict=True):
            assert abs(alt.logprob - v) <= TOL
            assert alt.token == ref.tokenizer.decode([alt.token_id])
        expected_rank = int((logprobs[pos] > logprobs[pos, tok.token_id]).sum()) + 1
        assert tok.rank == expected_rank


def test_rolling_matches_transformers_over_many_windows(llm, ref):
    from tests.conftest import MAX_MODEL_LEN

    text = default_corpus()
    tokens = ref.tokenizer.encode(text, add_special_tokens=False)
    max_seq_len = MAX_MODEL_LEN - 2
    assert len(tokens) > 3 * max_seq_len  # more than three windows

    (score,) = vllm_loglik.loglikelihood_rolling(llm, [text])
    assert score.token_ids == tokens  # every token exactly once, in order
    # The reference: lm-eval's windows, each run through transformers on its own.
    from vllm_loglik.spans import get_rolling_token_windows, make_disjoint_window

    windows = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(tokens, ref.tokenizer.bos_token_id, max_seq_len, 1)
    ]
    assert len(windows) >= 4
    expected = []
    for ctx, pred in windows:
        assert len(ctx) + len(pred) <= MAX_MODEL_LEN - 1
        lps, _ = ref.score(ctx + pred, len(ctx))
        expected.extend(lps)
    assert windows[0][0][0] == ref.tokenizer.bos_token_id
    for tok, lp in zip(score.tokens, expected, strict=True):
        assert abs(tok.logprob - lp) <= TOL
    assert score.logprob == pytest.approx(sum(expected), abs=1e-3)
    assert score.perplexity > 1

    # A short text is one window: BOS then the text.
    (short,) = vllm_loglik.loglikelihood_rolling(llm, ["Hello world"])
    ids = ref.tokenizer.encode("Hello world", add_special_tokens=False)
    assert_matches(short, ref, [ref.tokenizer.bos_token_id] + ids, 1)


def test_whole_prompt_scores_every_token_but_the_first(llm, ref):
    text = "Perplexity is the exponential of the average negative loglikelihood."
    ids = ref.tokenizer.encode(text)
    by_text, by_ids = vllm_loglik.prompt_loglikelihood(llm, [text, ids])
    assert_matches(by_text, ref, ids, 1)
    assert by_ids.token_ids == by_text.token_ids
    assert by_ids.logprob == pytest.approx(by_text.logprob, abs=TOL)


CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


def chat_reference_ids(tok, messages) -> tuple[list[int], int]:
    head = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    head_ids = tok.encode(head, add_special_tokens=False)
    full_ids = tok.encode(full, add_special_tokens=False)
    assert full_ids[: len(head_ids)] == head_ids
    return full_ids, len(head_ids)


def test_chat_last_message_with_and_without_candidates(llm, ref):
    (last,) = vllm_loglik.chat_loglikelihood(llm, [CHAT])
    ids, start = chat_reference_ids(ref.tokenizer, CHAT)
    assert ids.count(ref.tokenizer.bos_token_id) == 1
    assert_matches(last, ref, ids, start)
    assert ref.tokenizer.decode(last.token_ids).startswith("The capital of France is Paris.")
    assert last.text == CHAT[-1]["content"]

    candidates = ["The capital of France is Paris.", "It is Rome.", "Berlin 🙂"]
    [scored] = vllm_loglik.chat_loglikelihood(llm, [CHAT[:-1]], candidates=[candidates])
    assert len(scored) == 3
    assert scored[0].token_ids == last.token_ids
    assert scored[0].logprob == pytest.approx(last.logprob, abs=TOL)
    for text, score in zip(candidates, scored, strict=True):
        conv = CHAT[:-1] + [{"role": "assistant", "content": text}]
        assert_matches(score, ref, *chat_reference_ids(ref.tokenizer, conv))
        assert score.text == text


def spy_generate(llm, monkeypatch) -> list[tuple[list, list, list]]:
    """Record each `llm.generate` call: its prompts, sampling parameters and outputs."""
    calls = []
    original = llm.generate

    def spy(prompts, params, **kwargs):
        outputs = original(prompts, params, **kwargs)
        calls.append((prompts, params, outputs))
        return outputs

    monkeypatch.setattr(llm, "generate", spy)
    return calls


def test_one_engine_call_per_invocation_without_shared_contexts(llm, monkeypatch):
    calls = spy_generate(llm, monkeypatch)
    vllm_loglik.loglikelihood(llm, PAIRS[:4])  # no context fills a KV block
    vllm_loglik.loglikelihood_rolling(llm, [default_corpus(), "short"])
    assert [len(prompts) for prompts, _, _ in calls][0] == 4
    assert len(calls) == 2 and len(calls[1][0]) >= 5


def test_shared_contexts_are_computed_once_offline(llm, ref, monkeypatch):
    from tests.test_server import LONG_CONTEXT, OPTIONS

    pairs = [(LONG_CONTEXT, o) for o in OPTIONS] + PAIRS[:3]
    calls = spy_generate(llm, monkeypatch)
    scores = vllm_loglik.loglikelihood(llm, pairs, top_logprobs=2)
    # One call warms the long context up; one scores everything.
    (warm, _, _), (prompts, params, outputs) = calls
    ctx_len = len(ref.tokenizer.encode(LONG_CONTEXT))
    assert len(warm) == 1 and len(warm[0]["prompt_token_ids"]) == ctx_len - 1
    assert len(prompts) == len(pairs)
    for i, out in enumerate(outputs):
        if i < len(OPTIONS):  # read the context's full KV blocks from the cache
            assert not params[i].skip_reading_prefix_cache
            assert out.num_cached_tokens >= (ctx_len - 1) // 32 * 32 >= 64
        else:  # short contexts: scored without the cache
            assert params[i].skip_reading_prefix_cache
    for (context, continuation), score in zip(pairs, scores, strict=True):
        ctx, cont = reference_split(ref.tokenizer, context, continuation)
        assert_matches(score, ref, ctx + cont, len(ctx))

    # The chat candidates of one conversation share its rendered head the same way.
    chat = [{"role": "user", "content": LONG_CONTEXT}]
    calls.clear()
    [candidates] = vllm_loglik.chat_loglikelihood(llm, [chat], candidates=[OPTIONS])
    assert len(calls) == 2 and all(o.num_cached_tokens >= 64 for o in calls[1][2])
    calls.clear()
    monkeypatch.undo()
    uncached = [
        vllm_loglik.chat_loglikelihood(llm, [chat], candidates=[[option]])[0][0]
        for option in OPTIONS
    ]
    for got, want in zip(candidates, uncached, strict=True):
        assert got.token_ids == want.token_ids
        assert all(abs(a.logprob - b.logprob) <= TOL for a, b in zip(got.tokens, want.tokens))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda llm: vllm_loglik.loglikelihood(llm, [("context", "")]), "continuation must not"),
        (
            lambda llm: vllm_loglik.loglikelihood(llm, [("word " * 200, " more")]),
            r"requests\[0\]: context plus continuation is \d+ tokens long",
        ),
        (lambda llm: vllm_loglik.loglikelihood(llm, [("only one",)]), "pair"),
        (
            lambda llm: vllm_loglik.loglikelihood(llm, [("ok", " \ud800")]),
            r"requests\[0\]: the continuation is not valid Unicode: it holds a lone surrogate "
            r"\(U\+D800\) at character 1",
        ),
        (
            lambda llm: vllm_loglik.loglikelihood(llm, [("a\udfff", " b")]),
            "the context is not valid Unicode",
        ),
        (
            lambda llm: vllm_loglik.loglikelihood_rolling(llm, ["x\ud800"]),
            "the rolling text is not valid Unicode",
        ),
        (
            lambda llm: vllm_loglik.prompt_loglikelihood(llm, ["\ud800"]),
            "the prompt is not valid Unicode",
        ),
        (
            lambda llm: vllm_loglik.chat_loglikelihood(llm, [[{"role": "user", "content": "\ud83d"}]]),
            r"conversation\[0\].content is not valid Unicode",
        ),
        (lambda llm: vllm_loglik.loglikelihood(llm, "not a list"), "requests must be a list"),
        (lambda llm: vllm_loglik.chat_loglikelihood(llm, ["hello"]), "list of messages"),
        (lambda llm: vllm_loglik.chat_loglikelihood(llm, "hello"), "conversations must be"),
        (
            lambda llm: vllm_loglik.chat_loglikelihood(llm, [[{"role": "user"}]]),
            r"conversation\[0\].content",
        ),
        (
            lambda llm: vllm_loglik.chat_loglikelihood(llm, [CHAT[:-1]], candidates=[[""]]),
            "candidate message must not be empty",
        ),
        (
            lambda llm: vllm_loglik.loglikelihood(llm, [("The", " end")], top_logprobs=21),
            "top_logprobs must be an integer from 0 to 20",
        ),
        (lambda llm: vllm_loglik.loglikelihood_rolling(llm, [""]), "must not be empty"),
    ],
)
def test_bad_input_raises_value_error(llm, call, message):
    with pytest.raises(ValueError, match=message):
        call(llm)


def test_engine_still_serves_after_errors(llm, ref):
    with pytest.raises(ValueError):
        vllm_loglik.loglikelihood(llm, [("word " * 200, " more")])
    (score,) = vllm_loglik.loglikelihood(llm, [("A", "B")])
    ctx, cont = reference_split(ref.tokenizer, "A", "B")
    assert_matches(score, ref, ctx + cont, len(ctx))

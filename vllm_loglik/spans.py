"""Which tokens to score: the boundary rules of every scoring mode, as pure functions.

Every mode turns its input into one or more `Span`s: the token ids of a prompt, and the index
of the first prompt token whose logprob is summed. The engine computes logprobs for the whole
prompt; `vllm_loglik.scoring` then reads the scored tail. Nothing here needs an engine; the
functions take the engine's tokenizer, wrapped in `vllm_loglik.tokenization.Tokenization`,
which knows every tokenizer family's encodings and bytes.

One rule for every tokenizer: the scored tokens are those that the engine reads for the whole
text (what vLLM computes for that prompt), and a span is located on them, never tokenized
apart and glued on; the one exception is lm-eval's pair rule where BPE merged tokens across the
context/continuation boundary (see `pair_span`).

The modes:

* **continuation given context** (`pair_span`): lm-evaluation-harness's `loglikelihood`;
  `token_pair_span` when both are token ids.
* **rolling** (`rolling_spans`): lm-evaluation-harness's `loglikelihood_rolling`.
* **whole prompt** (`prompt_span`): every prompt token but the first, as the hosted API's
  boolean `loglikelihood: true` did.
* **last chat message** (`chat_span`): only the tokens of the final message of a conversation
  rendered with the model's chat template.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .tokenization import Tokenization


@dataclass(frozen=True)
class Span:
    """A prompt for the engine and the part of it that is scored.

    `prompt_token_ids[start:]` are the scored tokens; `start` is at least 1, because the
    first prompt token has no logprob. `trim` holds the prompt positions whose token carries
    the tokenizer's dummy prefix (SentencePiece's `▁` in front of a text): that leading space
    is not part of the text, so it is not part of the token's `bytes`
    (`vllm_loglik.tokenization`).
    """

    prompt_token_ids: list[int]
    start: int
    trim: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 1 <= self.start < len(self.prompt_token_ids):
            raise ValueError(
                f"a span must score at least one token after the first; got start={self.start} "
                f"for a prompt of {len(self.prompt_token_ids)} tokens"
            )

    @property
    def scored_token_ids(self) -> list[int]:
        return self.prompt_token_ids[self.start :]


def excerpt(value: Any, limit: int = 48) -> str:
    """`repr(value)` cut to about `limit` characters: what an error message may quote of a
    client's input (never a whole body)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}... ({len(text):,} chars)"


def check_text(text: str, what: str = "text") -> str:
    """`text`, if it can be encoded: a JSON string may hold a lone surrogate (`"\\ud800"`),
    which is not a Unicode character and which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} is not valid Unicode: it holds a lone surrogate "
            f"(U+{ord(text[e.start]):04X}) at character {e.start}, which cannot be encoded"
        ) from None
    return text


def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation.

    This is lm-evaluation-harness's rule (`TemplateLM._encode_pair`): `("Q: A", " B")` and
    `("Q: A ", "B")` both become `("Q: A", " B")`, so the word-boundary space is always part of
    the scored continuation, where BPE tokenizers attach it to the next word.
    """
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def pair_span(tokens: Tokenization, context: str, continuation: str) -> Span:
    """The span of `continuation` given `context`, split as lm-eval 0.4.13 does where it can.

    After `move_trailing_whitespace`, `ctx = encode(context)` and `whole = encode(context +
    continuation)`. When `ctx` is a prefix of `whole` (text with a space or punctuation at the
    boundary, nearly always), the continuation tokens are `whole[len(ctx):]`: lm-eval's rule,
    and the tokens that the engine reads for the whole text. An empty context becomes the
    prefix token alone, and the continuation is then encoded without special tokens (as the
    start of a text: with SentencePiece's dummy prefix), so there is never a second BOS.

    When `ctx` is not a prefix of `whole`, BPE merged tokens across the boundary (text without
    spaces: Chinese, Japanese, code, emoji). lm-eval's `whole[len(ctx):]` would then drop
    characters of the continuation, or leave no token at all (a zero logprob that wins every
    comparison). Here the continuation is encoded as it reads after other text
    (`Tokenization.encode_continuation`: no dummy prefix) and appended to `ctx`, so every
    character of it is scored, given exactly the context.

    Examples, with the demo tokenizer (it adds `<s>`)::

        ("The capital of France is", " Paris")
            ctx [<s> The ␣capital ␣of ␣Fran ce ␣is]   whole = ctx + [␣Paris]   scored [␣Paris]
        ("print(", ")")
            ctx [<s> pr int (]   whole [<s> pr int ()]: merged   scored [)]
    """
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise ValueError("context and continuation must both be strings")
    check_text(context, "the context")
    check_text(continuation, "the continuation")
    if continuation == "":
        raise ValueError("continuation must not be empty: there would be no token to score")
    context, continuation = move_trailing_whitespace(context, continuation)
    if context == "":
        ctx = [tokens.prefix_token_id]
        cont = tokens.encode_plain(continuation)
    else:
        ctx = tokens.encode(context)
        whole = tokens.encode(context + continuation)
        if whole[: len(ctx)] == ctx:
            cont = whole[len(ctx) :]
        else:
            cont = tokens.encode_continuation(continuation)
    if not cont:
        raise ValueError(
            f"continuation {excerpt(continuation)} encodes to no tokens after its context"
        )
    trim = tokens.trimmed(cont, continuation)
    return Span(ctx + cont, len(ctx), frozenset(len(ctx) + i for i in trim))


def token_pair_span(context_ids: Sequence[int], continuation_ids: Sequence[int], prefix: int) -> Span:
    """The span of a continuation given as token ids after a context given as token ids,
    each exactly as given (no text, so nothing to move or re-encode); an empty context is the
    prefix token alone."""
    ctx = list(context_ids) or [prefix]
    cont = list(continuation_ids)
    if not cont:
        raise ValueError("a continuation of token ids must not be empty")
    return Span(ctx + cont, len(ctx))


def prompt_span(prompt_token_ids: Sequence[int], trim: frozenset[int] = frozenset()) -> Span:
    """The whole prompt: every token except the first, which has nothing to condition on."""
    ids = list(prompt_token_ids)
    if len(ids) < 2:
        raise ValueError(
            f"loglikelihood of a prompt needs at least 2 tokens (the first is not scored); "
            f"got {len(ids)}"
        )
    return Span(ids, 1, trim)


def get_rolling_token_windows(
    token_list: Sequence[int], prefix_token: int, max_seq_len: int, context_len: int
) -> Iterator[tuple[list[int], list[int]]]:
    """lm-evaluation-harness 0.4.13's `get_rolling_token_windows`, unchanged in meaning.

    Yields `(input_tokens, pred_tokens)`; only the last `len(pred_tokens)` logits of each
    input are scored. The first window is the prefix token and then the text, so that the
    first token is predicted too. With `max_seq_len=4, context_len=1` and tokens `0..9`:

        ([P, 0, 1, 2], [0, 1, 2, 3])
        ([3, 4, 5, 6], [4, 5, 6, 7])
        ([5, 6, 7, 8], [8, 9])
    """
    if not 1 <= context_len <= max_seq_len:
        raise ValueError(f"need 1 <= context_len <= max_seq_len, got {context_len}, {max_seq_len}")
    if not token_list:
        return
    token_list = list(token_list)
    pred_len = max_seq_len - context_len + 1
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]
    predicted = first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[window_end - max_seq_len - 1 : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """lm-eval's `make_disjoint_window`: drop the input tokens that are also predicted."""
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


def rolling_spans(tokens: Tokenization, text: str, max_seq_len: int) -> list[Span]:
    """The disjoint rolling windows of `text`; each of its tokens is scored exactly once.

    The text is encoded without special tokens, and the windows are lm-eval's
    `get_rolling_token_windows(tokens, prefix, max_seq_len, context_len=1)` made disjoint.
    A window's prompt is at most `max_seq_len + 1` tokens long.

    Example, `max_seq_len=4`, a text of tokens `t0..t9`, prefix `P` (the BOS token):

        prompt [P, t0, t1, t2, t3]  scores t0 t1 t2 t3
        prompt [t3, t4, t5, t6, t7] scores t4 t5 t6 t7
        prompt [t7, t8, t9]         scores t8 t9
    """
    if not isinstance(text, str):
        raise ValueError(f"a rolling text must be a string, got {type(text).__name__}")
    check_text(text, "the rolling text")
    ids = tokens.encode_plain(text)
    return rolling_token_spans(ids, tokens.prefix_token_id, max_seq_len, tokens.trimmed(ids, text))


def rolling_token_spans(
    tokens: Sequence[int],
    prefix_token_id: int,
    max_seq_len: int,
    trim: frozenset[int] = frozenset(),
) -> list[Span]:
    """The disjoint rolling windows of a text given as its tokens (see `rolling_spans`);
    `trim` holds the indices of `tokens` that carry the dummy prefix."""
    if not tokens:
        raise ValueError("a rolling text must not be empty: there would be no token to score")
    windows = get_rolling_token_windows(list(tokens), prefix_token_id, max_seq_len, 1)
    spans, done = [], 0
    for ctx, pred in map(make_disjoint_window, windows):
        at = {len(ctx) + i - done for i in trim if done <= i < done + len(pred)}
        spans.append(Span(ctx + pred, len(ctx), frozenset(at)))
        done += len(pred)
    return spans


Message = Mapping[str, Any]


def validate_conversation(conversation: Any, what: str = "conversation") -> list[dict[str, Any]]:
    """Check that `conversation` is a non-empty list of `{"role": str, "content": str}`."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"{what} must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ValueError(f"{what}[{i}] must be a message object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{what}[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise ValueError(f"{what}[{i}].content must be a string")
        check_text(content, f"{what}[{i}].content")
        messages.append(dict(message))
    return messages


#: Renders a conversation (`add_generation_prompt` as the second argument) to the token ids
#: that the engine reads and the text (UTF-8) that they stand for.
Render = Callable[[list[dict[str, Any]], bool], tuple[list[int], bytes]]


def chat_span(tokens: Tokenization, render: Render, conversation: list[dict[str, Any]]) -> Span:
    """The span of the final message of `conversation` under a chat template.

    The tokens are those of the whole rendered conversation, as the engine reads it
    (`render(conversation, False)`); the scored ones start at the token that holds the first
    character of the final message's content. The earlier messages and the template's header
    for the final message are context; a token that holds both the end of the header and the
    start of the content (SentencePiece's `▁In` after `[/INST]`) is scored, since the model
    reads it as one. The template's end-of-turn markup after the content is scored too: it is
    what the model must emit to end its message there.

    Examples, `[user: "Hi", assistant: "Hello"]`. The demo model's template: context
    `<s><|user|>\nHi<|end|>\n<|assistant|>\n`, scored `Hello<|end|>\n`. Llama 2's
    template on a SentencePiece tokenizer: `<s>[INST] Hi [/INST] Hello </s>` reads
    `... ] ▁Hello ▁ </s>`, scored `▁Hello ▁ </s>`.
    """
    last = conversation[-1]
    full_ids, full = render(conversation, False)
    try:
        _, head = render(conversation[:-1], last["role"] == "assistant")
    except Exception:  # some templates refuse an empty or assistant-less conversation
        if len(conversation) > 1:
            raise
        head = b""
    if not full.startswith(head):
        raise ValueError(
            "the chat template does not render the earlier messages as a prefix of the whole "
            "conversation, so the final message cannot be isolated"
        )
    # Where the content starts: templates may strip it (Llama 2's does), so the stripped
    # content is looked for too; else scoring starts where the earlier messages end.
    content_at = len(head)
    for text in (last["content"], last["content"].strip()):
        found = full.find(text.encode("utf-8"), len(head)) if text else -1
        if found >= 0:
            content_at = found
            break
    alignment = tokens.align(full_ids, full)
    if alignment is None:
        raise ValueError(
            "the tokens of the rendered conversation do not spell its text, so the final "
            "message cannot be located on them"
        )
    start = max(alignment.token_at(content_at), 1)
    if start >= len(full_ids):
        raise ValueError("the final message renders to no tokens to score")
    return Span(full_ids, start, frozenset(i for i in alignment.trim if i >= start))

"""Which tokens to score: the boundary rules of every scoring mode, as pure functions.

Every mode turns its input into one or more `Span`s: the token ids of a prompt, and the index
of the first prompt token whose logprob is summed. The engine computes logprobs for the whole
prompt; `vllm_loglik.scoring` then reads the scored tail. Nothing here needs an engine; the
functions take the tokenizer (or an `encode` callable) that the engine uses.

The modes:

* **continuation given context** (`pair_span`): lm-evaluation-harness's `loglikelihood`.
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

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Span:
    """A prompt for the engine and the part of it that is scored.

    `prompt_token_ids[start:]` are the scored tokens; `start` is at least 1, because the
    first prompt token has no logprob.
    """

    prompt_token_ids: list[int]
    start: int

    def __post_init__(self) -> None:
        if not 1 <= self.start < len(self.prompt_token_ids):
            raise ValueError(
                f"a span must score at least one token after the first; got start={self.start} "
                f"for a prompt of {len(self.prompt_token_ids)} tokens"
            )

    @property
    def scored_token_ids(self) -> list[int]:
        return self.prompt_token_ids[self.start :]


class TextEncoder:
    """Encodes text the way vLLM encodes a prompt string, and knows the prefix token.

    `encode(text)` is `tokenizer.encode(text, add_special_tokens=True)`, which is what vLLM's
    completions path does, so a BOS token is added where the tokenizer adds one.
    `prefix_token_id` is the BOS token, or the EOS token when there is no BOS; it stands in for
    an empty context and starts the first rolling window.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        prefix = tokenizer.bos_token_id
        if prefix is None:
            prefix = tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to use as a prefix")
        self.prefix_token_id: int = prefix

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def encode_plain(self, text: str) -> list[int]:
        check_text(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))


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


def pair_span(encoder: TextEncoder, context: str, continuation: str) -> Span:
    """The span of `continuation` given `context`, split as lm-eval 0.4.13 does where it can.

    After `move_trailing_whitespace`, `ctx = encode(context)` and `whole = encode(context +
    continuation)`. When `ctx` is a prefix of `whole` (text with a space or punctuation at the
    boundary, nearly always), the continuation tokens are `whole[len(ctx):]`: lm-eval's rule.
    An empty context becomes the prefix token alone, and the continuation is then encoded
    without special tokens, so there is never a second BOS.

    When `ctx` is not a prefix of `whole`, BPE merged tokens across the boundary (text without
    spaces: Chinese, Japanese, code, emoji). lm-eval's `whole[len(ctx):]` would then drop
    characters of the continuation, or leave no token at all (a zero logprob that wins every
    comparison). Here the continuation is encoded on its own, without special tokens, and
    appended to `ctx`, so every character of it is scored, given exactly the context.

    Examples, with the demo tokenizer (it adds `<s>`)::

        ("The capital of France is", " Paris")
            ctx [<s> The ␣capital ␣of ␣Fran ce ␣is]   whole = ctx + [␣Paris]   scored [␣Paris]
        ("print(", ")")
            ctx [<s> pr int (]   whole [<s> pr int ()]: merged   scored encode_plain(")") = [)]
    """
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise ValueError("context and continuation must both be strings")
    check_text(context, "the context")
    check_text(continuation, "the continuation")
    if continuation == "":
        raise ValueError("continuation must not be empty: there would be no token to score")
    context, continuation = move_trailing_whitespace(context, continuation)
    if context == "":
        ctx = [encoder.prefix_token_id]
        cont = encoder.encode_plain(continuation)
    else:
        ctx = encoder.encode(context)
        whole = encoder.encode(context + continuation)
        if whole[: len(ctx)] == ctx:
            cont = whole[len(ctx) :]
        else:
            cont = encoder.encode_plain(continuation)
    if not cont:
        raise ValueError(
            f"continuation {excerpt(continuation)} encodes to no tokens after its context"
        )
    return Span(ctx + cont, len(ctx))


def prompt_span(prompt_token_ids: Sequence[int]) -> Span:
    """The whole prompt: every token except the first, which has nothing to condition on."""
    ids = list(prompt_token_ids)
    if len(ids) < 2:
        raise ValueError(
            f"loglikelihood of a prompt needs at least 2 tokens (the first is not scored); "
            f"got {len(ids)}"
        )
    return Span(ids, 1)


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


def rolling_spans(encoder: TextEncoder, text: str, max_seq_len: int) -> list[Span]:
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
    return rolling_token_spans(encoder.encode_plain(text), encoder.prefix_token_id, max_seq_len)


def rolling_token_spans(tokens: Sequence[int], prefix_token_id: int, max_seq_len: int) -> list[Span]:
    """The disjoint rolling windows of a text given as its tokens (see `rolling_spans`)."""
    if not tokens:
        raise ValueError("a rolling text must not be empty: there would be no token to score")
    windows = get_rolling_token_windows(list(tokens), prefix_token_id, max_seq_len, 1)
    spans = []
    for ctx, pred in map(make_disjoint_window, windows):
        spans.append(Span(ctx + pred, len(ctx)))
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


def chat_span(
    render: Callable[[list[dict[str, Any]], bool], str],
    encode_plain: Encode,
    conversation: list[dict[str, Any]],
) -> Span:
    """The span of the final message of `conversation` under a chat template.

    `render(messages, add_generation_prompt)` renders with the chat template (it includes the
    BOS token if the template writes one). The final message's tokens are those of the full
    rendering from where the message's content starts: the earlier messages (rendered with the
    generation prompt when the final message is the assistant's) and the template's header for
    the final message are context, not scored. The template's end-of-turn markup after the
    content is scored: it is what the model must emit to end its message there.

    Example, with the demo model's template and `[user: "Hi", assistant: "Hello"]`:
    context `<s><|user|>\\nHi<|end|>\\n<|assistant|>\\n`, scored `Hello<|end|>\\n`.
    """
    last = conversation[-1]
    full = render(conversation, False)
    try:
        head = render(conversation[:-1], last["role"] == "assistant")
    except Exception:  # some templates refuse an empty or assistant-less conversation
        if len(conversation) > 1:
            raise
        head = ""
    if not full.startswith(head):
        raise ValueError(
            "the chat template does not render the earlier messages as a prefix of the whole "
            "conversation, so the final message cannot be isolated"
        )
    # The message's own header (e.g. `<|user|>\n`) is context too: scoring starts where its
    # content does.
    content_at = full.find(last["content"], len(head)) if last["content"] else -1
    if content_at >= 0:
        head = full[:content_at]
    head_ids = encode_plain(head) if head else []
    full_ids = encode_plain(full)
    if full_ids[: len(head_ids)] != head_ids:
        # The boundary merged into one token: split on the text instead, tokenizing the head
        # alone and the rest after it, as the pair rule does.
        full_ids = head_ids + encode_plain(full[len(head) :])
    start = max(len(head_ids), 1)
    if start >= len(full_ids):
        raise ValueError("the final message renders to no tokens to score")
    return Span(full_ids, start)

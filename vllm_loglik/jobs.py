"""From user input to engine prompts and back: the part that the offline API and the server share.

A `Scorer` wraps one tokenizer and one engine's context length. Each mode method validates its
input and returns a `Job`: the spans to send to the engine, in order. `Scorer.finish` turns the
engine's prompt logprobs for those spans into a `Score`. The offline API and the HTTP plugin
differ only in how they reach the engine, so the two give the same numbers.

Length rule: vLLM accepts a prompt only if prompt + 1 generated token fits in `max_model_len`,
so a scored prompt is at most `max_model_len - 1` tokens, and rolling windows use
`max_seq_len = max_model_len - 2` (a window's prompt is `max_seq_len + 1` tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .engine_output import ScoredRows
from .scoring import Score, TokenArrays, combine, score_tokens, score_totals, scored_text
from .spans import (
    Span,
    chat_span,
    check_text,
    excerpt,
    pair_span,
    prompt_span,
    rolling_spans,
    rolling_token_spans,
    token_pair_span,
    validate_conversation,
)
from .tokenization import Tokenization
from .words import WordLayout, layout, word_scores

#: The most alternatives per token where no engine's cap is known (vLLM's default
#: `max_logprobs`, the OpenAI API's limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Job:
    """One result to compute: a label and the spans whose scored tokens make it up; with
    `words`, the words of `text` laid on those tokens (`Scorer.with_words`)."""

    text: str
    spans: list[Span]
    words: WordLayout | None = None
    #: The prompt's first token, when the job scores a prompt's tokens from the second on (the
    #: word it starts has no logprob for its first token).
    prompt_first: int | None = None


def check_top_logprobs(value: Any, field: str = "top_logprobs", cap: int = MAX_TOP_LOGPROBS) -> int:
    """`value` as alternatives per token: 0 to `cap` (the engine's `max_logprobs`)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= cap:
        raise ValueError(
            f"{field} must be an integer from 0 to {cap} (the engine's max_logprobs), got "
            f"{excerpt(value)}"
        )
    return value


class Scorer:
    """Builds the jobs of every scoring mode for one tokenizer and context length.

    `tokenizer` is the engine's (`LLM.get_tokenizer()`, the server's renderer's): a
    transformers tokenizer, or vLLM's `MistralTokenizer` under `tokenizer_mode="mistral"`.
    """

    def __init__(self, tokenizer: Any, max_model_len: int, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.tokens = Tokenization(tokenizer)
        self.max_model_len = max_model_len
        self.max_prompt_len = max_model_len - 1
        self.chat_template = chat_template

    def _fits(self, span: Span, what: str) -> Span:
        n = len(span.prompt_token_ids)
        if n > self.max_prompt_len:
            raise ValueError(
                f"{what} is {n} tokens long, more than the {self.max_prompt_len} tokens that "
                f"fit the model's context (max_model_len {self.max_model_len} minus 1)"
            )
        return span

    def _ids(self, value: Any, what: str) -> list[int] | None:
        """`value` as token ids (checked against the vocabulary), or None if it is no list."""
        if isinstance(value, str) or not isinstance(value, Sequence):
            return None
        return self.tokens.check_ids(value, what)

    def pair(self, context: str, continuation: str) -> Job:
        """lm-eval `loglikelihood`: `continuation` given `context` (see `spans.pair_span`)."""
        span = pair_span(self.tokens, context, continuation)
        return Job(continuation, [self._fits(span, "context plus continuation")])

    def rolling(self, text: str | Sequence[int]) -> Job:
        """lm-eval `loglikelihood_rolling`: every token of `text`, in disjoint windows. A text
        given as token ids is taken as its tokens (no special token is added)."""
        if isinstance(text, str):
            return Job(text, rolling_spans(self.tokens, text, self.max_model_len - 2))
        ids = self._ids(text, "prompt") or []
        trim = self.tokens.trimmed(ids)
        spans = rolling_token_spans(ids, self.tokens.prefix_token_id, self.max_model_len - 2, trim)
        return Job(self.tokens.text_of(ids, trim), spans)

    def pair_ids(self, context: str | Sequence[int], continuation: str | Sequence[int]) -> Job:
        """A continuation after a context where either is given as token ids (two texts go to
        `pair`). Token ids are used exactly as given. A text context is encoded as vLLM encodes
        a prompt string; a text continuation is encoded as it reads after other text
        (`Tokenization.encode_continuation`) and appended: with token ids on one side, there
        is no whole text to split."""
        ctx = self._ids(context, "context")
        if ctx is None:
            ctx = self.tokens.encode(check_text(context, "the context")) if context else []
        cont = self._ids(continuation, "continuation")
        if cont is None:
            check_text(continuation, "the continuation")
            if continuation == "":
                raise ValueError("continuation must not be empty: there would be no token to score")
            cont = self.tokens.encode_continuation(continuation)
            text = continuation
        else:
            text = self.tokens.text_of(cont)
        span = token_pair_span(ctx, cont, self.tokens.prefix_token_id)
        return Job(text, [self._fits(span, "context plus continuation")])

    def prompt(self, prompt: str | Sequence[int]) -> Job:
        """Every prompt token but the first; a string is encoded as vLLM encodes a prompt."""
        if isinstance(prompt, str):
            ids = self.tokens.encode(check_text(prompt, "the prompt"))
            trim = self.tokens.trimmed(ids, prompt)
        elif isinstance(prompt, Sequence):
            ids = self.tokens.check_ids(prompt, "prompt")
            trim = self.tokens.trimmed(ids)
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        span = self._fits(prompt_span(ids, trim), "the prompt")
        return Job(scored_text(self.tokens, span), [span], prompt_first=ids[0])

    def chat(
        self,
        conversation: Any,
        candidate: str | dict[str, Any] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> Job:
        """The final message of `conversation` under the chat template.

        With `candidate`, that message (a string is an assistant message) is appended to the
        conversation and scored instead.
        """
        messages = validate_conversation(conversation)
        if candidate is not None:
            if isinstance(candidate, str):
                candidate = {"role": "assistant", "content": candidate}
            (candidate,) = validate_conversation([candidate], "candidate")
            if candidate["content"] == "":
                raise ValueError("a candidate message must not be empty")
            messages = messages + [candidate]
        elif messages[-1]["content"] == "":
            raise ValueError(
                f"the final message (conversation[{len(messages) - 1}].content) must not be "
                "empty: it is the one scored, and would have none of its text to score"
            )
        span = chat_span(self.tokens, self._renderer(chat_template_kwargs), messages)
        return Job(messages[-1]["content"], [self._fits(span, "the conversation")])

    def chat_prompt(
        self,
        conversation: Any,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> Job:
        """Every token of the rendered conversation except the first, as the server's chat
        endpoint would render it as a prompt."""
        messages = validate_conversation(conversation)
        ids, text = self._renderer(chat_template_kwargs)(messages, add_generation_prompt)
        span = self._fits(prompt_span(ids, self.tokens.trimmed(ids, text)), "the conversation")
        return Job(text.decode("utf-8", errors="replace"), [span], prompt_first=ids[0])

    def _renderer(self, chat_template_kwargs: dict[str, Any] | None):
        kwargs = dict(chat_template_kwargs or {})

        def render(msgs: list[dict[str, Any]], add_generation_prompt: bool) -> tuple[list[int], bytes]:
            options = dict(kwargs)
            if add_generation_prompt:
                # The head of a conversation whose final message continues (the request's
                # `continue_final_message`) ends with the generation prompt: the two options
                # exclude each other, and the option belongs to the whole rendering only.
                options.pop("continue_final_message", None)
            return self.tokens.render_chat(msgs, add_generation_prompt, self.chat_template, options)

        return render

    def with_words(
        self,
        job: Job,
        words: bool | Sequence[tuple[int, int]],
        corrected: bool,
        field: str = "loglikelihood.words",
    ) -> Job:
        """`job` with its words laid on its scored tokens (`vllm_loglik.words.layout`): True
        for the runs of non-whitespace of its text, or `[start, end)` character offsets into
        it. Offsets that split a token are a `words.WordsError` that names `field[i]`."""
        ids = [t for span in job.spans for t in span.scored_token_ids]
        trims = [p in span.trim for span in job.spans for p in range(span.start, len(span.prompt_token_ids))]
        first = job.prompt_first if job.spans[0].start == 1 else None
        placed = layout(self.tokens, job.text, ids, trims, words, corrected, first, field)
        return Job(job.text, job.spans, placed, job.prompt_first)

    def finish(
        self,
        job: Job,
        scored: Sequence[ScoredRows],
        top_logprobs: int = 0,
        content: bool | str = True,
    ) -> Score:
        """The `Score` of `job` from the `ScoredRows` of each of its spans, as
        `vllm_loglik.engine_output.span_logprobs` reads them from the engine's output.

        `content=False` computes only the totals (`tokens` is then empty, `num_tokens` counts
        the scored tokens): no token is decoded, and no object is built per token;
        `content="arrays"` adds the scored tokens as arrays (`Score.arrays`, `TokenArrays`).
        """
        if content is not True:
            logprob, is_greedy, count = 0.0, True, 0
            for span, rows in zip(job.spans, scored, strict=True):
                total, greedy = score_totals(span, rows)
                logprob, is_greedy = logprob + total, is_greedy and greedy
                count += len(rows)
            arrays = TokenArrays.of(job.spans, scored, top_logprobs) if content == "arrays" else None
            score = Score(job.text, logprob, is_greedy, count, [], arrays=arrays)
        else:
            parts = [
                score_tokens(span, rows, self.tokens, top_logprobs)
                for span, rows in zip(job.spans, scored, strict=True)
            ]
            score = combine(job.text, parts)
        if job.words is None:
            return score
        logprobs = [lp for rows in scored for lp in rows.logprobs]
        starts = ends = None
        if job.words.corrected:
            starts = [b for rows in scored for b in (rows.starts or ())]
            ends = [b for rows in scored for b in (rows.ends or ())]
        words = word_scores(job.words, logprobs, starts, ends)
        return replace(score, words=words, words_left_out=job.words.left_out)

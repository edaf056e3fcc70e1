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
from dataclasses import dataclass
from typing import Any

from .engine_output import ScoredRows
from .scoring import Score, TokenDecoder, combine, score_tokens, score_totals
from .spans import (
    Span,
    TextEncoder,
    chat_span,
    check_text,
    excerpt,
    pair_span,
    prompt_span,
    rolling_spans,
    rolling_token_spans,
    validate_conversation,
)

#: The most alternatives per token that a request may ask for (the OpenAI API's limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Job:
    """One result to compute: a label and the spans whose scored tokens make it up."""

    text: str
    spans: list[Span]


def check_top_logprobs(value: Any, field: str = "top_logprobs") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ValueError(
            f"{field} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {excerpt(value)}"
        )
    return value


class Scorer:
    """Builds the jobs of every scoring mode for one tokenizer and context length."""

    def __init__(self, tokenizer: Any, max_model_len: int, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer)
        self.decode = TokenDecoder(tokenizer)
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

    def pair(self, context: str, continuation: str) -> Job:
        """lm-eval `loglikelihood`: `continuation` given `context` (see `spans.pair_span`)."""
        span = pair_span(self.encoder, context, continuation)
        return Job(continuation, [self._fits(span, "context plus continuation")])

    def rolling(self, text: str | Sequence[int]) -> Job:
        """lm-eval `loglikelihood_rolling`: every token of `text`, in disjoint windows. A text
        given as token ids is taken as its tokens (no special token is added)."""
        if isinstance(text, str):
            return Job(text, rolling_spans(self.encoder, text, self.max_model_len - 2))
        ids = list(text)
        spans = rolling_token_spans(ids, self.encoder.prefix_token_id, self.max_model_len - 2)
        return Job(self.tokenizer.decode(ids), spans)

    def pair_ids(self, context_ids: Sequence[int], continuation: str) -> Job:
        """`continuation` after a context given as token ids: the continuation is encoded on its
        own, without special tokens, and appended (there is no text to move whitespace in)."""
        check_text(continuation, "the continuation")
        if continuation == "":
            raise ValueError("continuation must not be empty: there would be no token to score")
        ids = list(context_ids) or [self.encoder.prefix_token_id]
        cont = self.encoder.encode_plain(continuation)
        span = self._fits(Span(ids + cont, len(ids)), "context plus continuation")
        return Job(continuation, [span])

    def prompt(self, prompt: str | Sequence[int]) -> Job:
        """Every prompt token but the first; a string is encoded as vLLM encodes a prompt."""
        if isinstance(prompt, str):
            ids = self.encoder.encode(check_text(prompt, "the prompt"))
        elif isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        span = self._fits(prompt_span(ids), "the prompt")
        return Job(self.tokenizer.decode(ids[1:]), [span])

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
        span = chat_span(self._renderer(chat_template_kwargs), self.encoder.encode_plain, messages)
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
        text = self._renderer(chat_template_kwargs)(messages, add_generation_prompt)
        span = self._fits(prompt_span(self.encoder.encode_plain(text)), "the conversation")
        return Job(text, [span])

    def _renderer(self, chat_template_kwargs: dict[str, Any] | None):
        kwargs = dict(chat_template_kwargs or {})

        def render(msgs: list[dict[str, Any]], add_generation_prompt: bool) -> str:
            options = dict(kwargs)
            if add_generation_prompt:
                # The head of a conversation whose final message continues (the request's
                # `continue_final_message`) ends with the generation prompt: the two options
                # exclude each other, and the option belongs to the whole rendering only.
                options.pop("continue_final_message", None)
            return self.tokenizer.apply_chat_template(
                msgs,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                **options,
            )

        return render

    def finish(
        self,
        job: Job,
        scored: Sequence[ScoredRows],
        top_logprobs: int = 0,
        content: bool = True,
    ) -> Score:
        """The `Score` of `job` from the `ScoredRows` of each of its spans, as
        `vllm_loglik.engine_output.span_logprobs` reads them from the engine's output.

        `content=False` computes only the totals (`tokens` is then empty, `num_tokens` counts
        the scored tokens): no token is decoded, and no object is built per token.
        """
        if not content:
            logprob, is_greedy, count = 0.0, True, 0
            for span, rows in zip(job.spans, scored, strict=True):
                total, greedy = score_totals(span, rows)
                logprob, is_greedy = logprob + total, is_greedy and greedy
                count += len(rows)
            return Score(job.text, logprob, is_greedy, count, [])
        parts = [
            score_tokens(span, rows, self.decode, top_logprobs)
            for span, rows in zip(job.spans, scored, strict=True)
        ]
        return combine(job.text, parts)

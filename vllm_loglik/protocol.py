"""The HTTP contract of the `loglikelihood` field, as pydantic models.

Clients can import this module without vLLM to build requests and parse responses.

Request (an extra field on `/v1/completions` and `/v1/chat/completions`)::

    "loglikelihood": true
        Score every prompt token except the first (the hosted API's boolean field).
    "loglikelihood": {"continuations": [...], "scope": "prompt" | "last_message" | "rolling",
                      "top_logprobs": 0..max_logprobs, "temperature": T,
                      "content": true | false | "arrays",
                      "words": true | [[start, end], ...], "word_probability": "corrected"}
        See `LoglikelihoodOptions`.

Response: each choice gains `loglikelihood`, a list of `LoglikelihoodEntry`, next to the
native `logprobs`::

    {"index": 0, "text": " Paris", "logprob": -3.21, "num_tokens": 2, "is_greedy": true,
     "content": [{"token": " Par", "token_id": 412, "logprob": -1.02, "bytes": [32, 80, 97, 114],
                  "rank": 1, "top_logprobs": [{"token": " Par", "token_id": 412,
                                               "logprob": -1.02, "bytes": [...]}]}, ...]}

With `"content": false` (the compact response), an entry has no `content`: only `index`,
`text`, `logprob`, `num_tokens` and `is_greedy`, which is what multiple choice and bulk
scoring need, at a fraction of the server's work per token.

With `"content": "arrays"`, an entry is the compact one plus `arrays`: the scored tokens' ids,
logprobs, ranks and top k as base64 arrays (`EntryArrays`, read with `decode_arrays`).

With an OpenAI client, `entries(choice)` reads them from a response choice.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .spans import excerpt

#: The default cap on `continuations` per request; the server reads
#: `VLLM_LOGLIK_MAX_CONTINUATIONS` to change it.
DEFAULT_MAX_CONTINUATIONS = 64


class LoglikelihoodOptions(BaseModel):
    """The object form of the `loglikelihood` request field. Unknown options are rejected."""

    model_config = ConfigDict(extra="forbid")

    continuations: list[str | list[StrictInt]] | None = Field(
        default=None,
        description=(
            "Texts to score. Completions: each is scored as a continuation of the prompt, as "
            "lm-evaluation-harness's loglikelihood does (trailing whitespace of the prompt moves "
            "to the continuation); a list of token ids is scored exactly as given, after the "
            "prompt's tokens (no detokenize-retokenize round trip: best-of-n reranking, RL). "
            "Chat: each is a candidate final assistant message, appended to `messages` and "
            "scored under the chat template. One entry per continuation."
        ),
    )
    scope: Literal["prompt", "last_message", "rolling"] = Field(
        default="prompt",
        description=(
            "`prompt`: every prompt token except the first. `last_message` (chat only): only "
            "the tokens of the final message of `messages`. `rolling` (completions only): every "
            "token of a prompt text of any length, scored in the disjoint windows of "
            "lm-evaluation-harness's loglikelihood_rolling (the first after the BOS token), "
            "as one entry: the perplexity of a long document."
        ),
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Alternatives per scored token, up to the server's --max-logprobs (vLLM's default "
            "20). Default: the request's `top_logprobs` (chat) or `logprobs` (completions), "
            "else 0. Needs `content: true` or `\"arrays\"`."
        ),
    )
    temperature: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Score under the model's distribution at this temperature: log softmax(logits / T) "
            "(a teacher's, in distillation). Default 1, the model's own. vLLM's own prompt "
            "logprobs ignore the request's `temperature`; this one does not. Not with `words`."
        ),
    )
    words: StrictBool | list[list[StrictInt]] | list[list[list[StrictInt]]] | None = Field(
        default=None,
        description=(
            "Word-level scores: each entry gains `words`. `true`: the scored text's words are its "
            "maximal runs of non-whitespace characters (punctuation stays attached). A list of "
            "[start, end] character offsets into each entry's text: your own words, in order, "
            "not overlapping, not splitting a token (a token may run on into whitespace); or, "
            "with several continuations, one such list per continuation."
        ),
    )
    word_probability: Literal["corrected", "tokens"] = Field(
        default="corrected",
        description=(
            "`corrected`: log p(word | context), the sum of its tokens' logprobs plus log P(a "
            "word starts) after it, less log P(its first token's class) before it (Pimentel "
            "and Meister 2024). `tokens`: the plain sum of its tokens' logprobs."
        ),
    )
    content: bool | Literal["arrays"] = Field(
        default=True,
        description=(
            "`true`: each entry lists its scored tokens in `content`. `false`: the compact "
            "response, whose entries hold only `index`, `text`, `logprob`, `num_tokens` and "
            "`is_greedy`; the server then builds nothing per token. `\"arrays\"`: the compact "
            "entry plus `arrays`, the scored tokens' ids, logprobs, ranks and top "
            "`top_logprobs` as base64 arrays (`EntryArrays`): many long texts, no JSON object "
            "per token."
        ),
    )


LoglikelihoodField = bool | LoglikelihoodOptions | None


def parse_loglikelihood(value: Any) -> LoglikelihoodField:
    """Validate the raw `loglikelihood` value, with one clear message that names the field.

    Only JSON `true`/`false`/`null` or an object are accepted: no `"yes"`, no `1`.
    """
    if value is None or isinstance(value, (bool, LoglikelihoodOptions)):
        return value
    if not isinstance(value, dict):
        raise ValueError(
            "loglikelihood must be true, false or an object with continuations, scope, "
            f"top_logprobs and content; got {type(value).__name__}"
        )
    try:
        return LoglikelihoodOptions.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        # A key is the client's input: quote a short excerpt of it.
        where = ".".join(
            str(p) if not isinstance(p, str) or len(p) <= 32 else excerpt(p, 32)
            for p in ("loglikelihood", *err["loc"])
        )
        if err["loc"][:1] == ("words",):
            raise ValueError(
                "loglikelihood.words must be true, a list of [start, end] character offsets, "
                "or (several continuations) one such list per continuation"
            ) from None
        if err["type"] == "extra_forbidden":
            raise ValueError(
                f"{where} is not a loglikelihood option (known: continuations, scope, "
                "top_logprobs, temperature, content, words, word_probability)"
            ) from None
        raise ValueError(f"{where}: {err['msg']}") from None

LOGLIKELIHOOD_DESCRIPTION = (
    "vllm-loglik: score given text. `true` returns the log-probability of every prompt token "
    "except the first; an object selects continuations, the scope, top_logprobs and whether "
    "entries list their tokens (content). Each choice "
    "of the response then has a `loglikelihood` list."
)


class TopLogprobEntry(BaseModel):
    token: str
    token_id: int
    logprob: float
    bytes: list[int] | None = None


class TokenEntry(BaseModel):
    """One scored token: log P(token | every token before it), and its rank (1 = argmax)."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int] | None = None
    rank: int
    top_logprobs: list[TopLogprobEntry] = Field(default_factory=list)


class WordEntry(BaseModel):
    """One word of a scored text."""

    text: str
    offset: int = Field(description="Characters into the entry's `text`.")
    num_tokens: int
    logprob: float = Field(description="log p(word | context), as `word_probability` asks.")
    tokens_logprob: float = Field(description="The plain sum of the word's tokens' logprobs.")


class EntryArrays(BaseModel):
    """The scored tokens of an entry as arrays (`content: "arrays"`): base64 of little-endian
    int32 / float32 values, `n` rows (the entry's scored tokens) and `k` alternatives per row
    (best first; `-inf` and 0 past what the engine returned). `decode_arrays` reads them."""

    shape: list[int] = Field(description="`[n, k]`.")
    token_ids: str = Field(description="int32 `[n]`: the scored tokens.")
    logprobs: str = Field(description="float32 `[n]`: their logprobs.")
    ranks: str = Field(description="int32 `[n]`: their ranks (1 = the argmax; ties count higher).")
    top_token_ids: str = Field(description="int32 `[n, k]`: the k most likely tokens.")
    top_logprobs: str = Field(description="float32 `[n, k]`: their logprobs.")


def arrays_json(arrays: Any) -> dict[str, Any]:
    """The `EntryArrays` JSON of a `vllm_loglik.scoring.TokenArrays`."""
    import base64

    def b64(a: Any) -> str:
        return base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode("ascii")

    return {
        "shape": [int(arrays.top_token_ids.shape[0]), int(arrays.top_token_ids.shape[1])],
        "token_ids": b64(arrays.token_ids),
        "logprobs": b64(arrays.logprobs),
        "ranks": b64(arrays.ranks),
        "top_token_ids": b64(arrays.top_token_ids),
        "top_logprobs": b64(arrays.top_logprobs),
    }


def decode_arrays(entry: Any) -> dict[str, Any]:
    """An entry's `arrays` (a dict, an `EntryArrays` or a `LoglikelihoodEntry`) as numpy arrays:
    `token_ids`, `logprobs`, `ranks` `[n]`, `top_token_ids`, `top_logprobs` `[n, k]`."""
    import base64

    import numpy as np

    if isinstance(entry, LoglikelihoodEntry):
        entry = entry.arrays
    if isinstance(entry, dict) and "arrays" in entry:
        entry = entry["arrays"]
    if isinstance(entry, BaseModel):
        entry = entry.model_dump()
    n, k = entry["shape"]

    def array(key: str, dtype: Any, shape: tuple[int, ...]) -> Any:
        raw = base64.b64decode(entry[key])
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)

    return {
        "token_ids": array("token_ids", np.int32, (n,)),
        "logprobs": array("logprobs", np.float32, (n,)),
        "ranks": array("ranks", np.int32, (n,)),
        "top_token_ids": array("top_token_ids", np.int32, (n, k)),
        "top_logprobs": array("top_logprobs", np.float32, (n, k)),
    }


class LoglikelihoodEntry(BaseModel):
    """The loglikelihood of one scored text: the prompt, the last message or a continuation."""

    index: int = Field(description="Position of the continuation in the request, else 0.")
    text: str = Field(description="The scored text.")
    logprob: float = Field(description="Sum of the scored tokens' logprobs.")
    num_tokens: int
    is_greedy: bool = Field(description="Every scored token is the model's argmax.")
    content: list[TokenEntry] | None = Field(
        default=None,
        description="The scored tokens, in order; absent in the compact response (content: false).",
    )
    words: list[WordEntry] | None = Field(
        default=None, description="The scored text's words, in order (with `words` asked for)."
    )
    arrays: EntryArrays | None = Field(
        default=None, description='The scored tokens as arrays (with `content: "arrays"`).'
    )
    words_left_out: int | None = Field(
        default=None,
        description=(
            "Words left out of `words`: 1 when the prompt's first word starts at its first "
            "token, which has no logprob; else 0."
        ),
    )


def entry_from_score(
    index: int, score: Any, content: bool | str = True, plain: bool = True
) -> dict[str, Any]:
    """The JSON of a `LoglikelihoodEntry` from a `vllm_loglik.Score` (built with no validation:
    it holds an item per scored token, so validation would only cost time); `content=False`
    gives the compact entry. With `plain=False`, `content` holds the score's own `TokenScore`
    structs, which `msgspec.json.encode` writes in this same shape (what the server does)."""
    entry = {
        "index": index,
        "text": score.text,
        "logprob": score.logprob,
        "num_tokens": score.num_tokens,
        "is_greedy": score.is_greedy,
    }
    if content is True:
        entry["content"] = msgspec.to_builtins(score.tokens) if plain else score.tokens
    if getattr(score, "arrays", None) is not None:
        entry["arrays"] = arrays_json(score.arrays)
    if score.words is not None:
        entry["words"] = msgspec.to_builtins(score.words) if plain else score.words
        entry["words_left_out"] = score.words_left_out
    return entry


def entries(choice: Any) -> list[LoglikelihoodEntry]:
    """The `loglikelihood` entries of a response choice: a dict, or an `openai` client object."""
    if isinstance(choice, dict):
        raw = choice.get("loglikelihood")
    else:
        raw = getattr(choice, "loglikelihood", None)
        if raw is None and getattr(choice, "model_extra", None):
            raw = choice.model_extra.get("loglikelihood")
    if raw is None:
        raise ValueError("this choice has no `loglikelihood` field")
    return [LoglikelihoodEntry.model_validate(e) for e in raw]


__all__ = [
    "DEFAULT_MAX_CONTINUATIONS",
    "EntryArrays",
    "LoglikelihoodEntry",
    "LoglikelihoodField",
    "LoglikelihoodOptions",
    "TokenEntry",
    "TopLogprobEntry",
    "WordEntry",
    "arrays_json",
    "decode_arrays",
    "entries",
    "entry_from_score",
    "parse_loglikelihood",
]

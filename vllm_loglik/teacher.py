"""Teacher and reference logprobs for post-training, in the shapes TRL sends and reads.

On-policy distillation, GRPO/PPO with a KL term, DPO and self-distillation need, per completion
token of sequences that another model sampled, a frozen model's logprob of the actual token and
its top k. TRL asks a vLLM server for them with one request of token sequences
(`trl vllm-serve`'s `POST /get_sequence_logprobs/`; `vllm_loglik.server.teacher` serves it)::

    {"sequences": [[ids of prompt + completion], ...], "prompt_lengths": [p, ...],
     "top_logprobs": k, "temperature": T, "response_format": "json" | "binary"}

Sequence i's completion region is positions `p_i .. len_i - 1`: each position's row holds log
P(token | every token before it) for the actual token and the k most likely tokens, best first,
from log softmax(logits / T). With `p_i = 0` the first position has nothing to condition on:
its row is empty (-inf, token id 0), as `trl vllm-serve` answers it. A worked example, k = 2::

    sequence  [5, 9, 4, 7]   prompt_length 2   ->  completion [4, 7], rows at positions 2 and 3
    logprobs          [[[-0.1, -2.5], [-0.3, -1.9]]]     top 2 of each row, best first
    logprob_token_ids [[[4, 8], [7, 2]]]
    actual_logprobs   [[[-0.1], [-0.3]]]                 the actual token's, at any rank

The sequences that share a prompt (a GRPO group's n completions, DPO's chosen and rejected) are
scored as continuations of one context, which the engine computes once where prefix caching is
on (`vllm_loglik.engine_requests`); `trl vllm-serve` and a plain vLLM computes it for each.

This module is the arithmetic only (no engine): `sequence_spans` checks a request and cuts its
spans, `SequenceLogprobs.from_rows` lays the engine's rows into padded arrays, and `json_body`
and `binary_body` answer in `trl vllm-serve`'s two formats.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .engine_output import ScoredRows
from .scoring import TokenArrays
from .spans import Span, excerpt

#: TRL's default number of top logprobs per position (more than vLLM's default cap of 20:
#: start a teacher server with `--max-logprobs 100`).
TRL_TOP_LOGPROBS = 100


def check_temperature(value: Any, field: str = "temperature") -> float:
    """A finite temperature > 0 (1 = the model's own distribution)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{field} must be a number greater than 0, got {excerpt(value)}")
    return float(value)


def sequence_spans(
    sequences: Any,
    prompt_lengths: Any,
    check_ids: Any,
    max_prompt_len: int,
    max_model_len: int,
) -> list[Span | None]:
    """The span that scores each sequence's completion region (None where it scores no token:
    an empty completion, or a one-token sequence with prompt length 0), after checking every
    sequence before any reaches the engine. `check_ids(ids, what)` checks token ids against
    the vocabulary (`Tokenization.check_ids`); a sequence may be `max_prompt_len` tokens long
    (the engine's context less the one token that every request generates).

    Raises `ValueError` naming the field: `sequences[i]`, `prompt_lengths[i]`, or the two
    lists' lengths."""
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise ValueError("sequences must be a list of lists of token ids")
    if isinstance(prompt_lengths, (str, bytes)) or not isinstance(prompt_lengths, Sequence):
        raise ValueError("prompt_lengths must be a list of integers")
    if len(sequences) != len(prompt_lengths):
        raise ValueError(
            f"sequences and prompt_lengths must have the same length, got {len(sequences)} "
            f"sequences and {len(prompt_lengths)} prompt_lengths"
        )
    spans: list[Span | None] = []
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"sequences[{i}] must be a list of token ids")
        if not seq:
            raise ValueError(f"sequences[{i}] must not be empty")
        ids = check_ids(seq, f"sequences[{i}]")
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"sequences[{i}] is {len(ids)} tokens long, more than the {max_prompt_len} that "
                f"fit the model's context (max_model_len {max_model_len} minus 1)"
            )
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= len(ids):
            raise ValueError(
                f"prompt_lengths[{i}] is {excerpt(p)}, out of range: it must be an integer "
                f"from 0 to {len(ids)}, the length of sequences[{i}]"
            )
        start = max(p, 1)
        spans.append(Span(ids, start) if start < len(ids) else None)
    return spans


@dataclass(frozen=True)
class SequenceLogprobs:
    """The completion region of each sequence, padded to the longest (`T`).

    Row `t` of sequence `i` is prompt position `prompt_lengths[i] + t`. Padding (and the empty
    first row of a prompt length 0) is `-inf` for a logprob and 0 for a token id and a rank.
    """

    #: `[B, T, k]` float32: the top k logprobs of each row, best first.
    logprobs: Any
    #: `[B, T, k]` int32: their token ids.
    token_ids: Any
    #: `[B, T]` float32: the logprob of the actual token, whatever its rank.
    actual_logprobs: Any
    #: `[B, T]` int32: the actual tokens.
    actual_token_ids: Any
    #: `[B, T]` int32: the actual token's rank (1 = the most likely; ties count as higher).
    ranks: Any
    #: The completion length of each sequence (`len - prompt_length`).
    completion_lengths: list[int]

    @property
    def top_logprobs(self) -> int:
        return int(self.logprobs.shape[2])

    @classmethod
    def from_rows(
        cls,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        spans: Sequence[Span | None],
        rows: Sequence[ScoredRows | None],
        top_logprobs: int,
    ) -> SequenceLogprobs:
        """The arrays from the engine's rows of each sequence's span (`sequence_spans`)."""
        import numpy as np

        lengths = [len(s) - p for s, p in zip(sequences, prompt_lengths, strict=True)]
        b, t, k = len(lengths), max(lengths, default=0), top_logprobs
        logprobs = np.full((b, t, k), -np.inf, dtype=np.float32)
        token_ids = np.zeros((b, t, k), dtype=np.int32)
        actual = np.full((b, t), -np.inf, dtype=np.float32)
        actual_ids = np.zeros((b, t), dtype=np.int32)
        ranks = np.zeros((b, t), dtype=np.int32)
        for i, (span, row) in enumerate(zip(spans, rows, strict=True)):
            if span is None or row is None:
                continue
            a = TokenArrays.of([span], [row], k)
            first = span.start - prompt_lengths[i]  # 1 with prompt length 0, else 0
            at = slice(first, first + len(row))
            actual[i, at], actual_ids[i, at], ranks[i, at] = a.logprobs, a.token_ids, a.ranks
            logprobs[i, at], token_ids[i, at] = a.top_logprobs, a.top_token_ids
        return cls(logprobs, token_ids, actual, actual_ids, ranks, lengths)


def json_body(result: SequenceLogprobs) -> dict[str, Any]:
    """`trl vllm-serve`'s `"json"` answer: per sequence and completion row, the logprobs and
    token ids of vLLM's prompt-logprob entry sorted by rank: the top k, and the actual token
    after them where it is not among them. A row with no logprob (the first of a prompt length
    0) is empty. The binary fields are null, as in `trl vllm-serve`'s response model."""
    all_logprobs, all_ids = [], []
    top_lp, top_ids = result.logprobs.tolist(), result.token_ids.tolist()
    actual, actual_ids = result.actual_logprobs.tolist(), result.actual_token_ids.tolist()
    ranks = result.ranks.tolist()
    k = result.top_logprobs
    for i, n in enumerate(result.completion_lengths):
        seq_lp, seq_ids = [], []
        for t in range(n):
            rank = ranks[i][t]
            if rank == 0:  # no logprob at this row
                seq_lp.append([])
                seq_ids.append([])
                continue
            ids, lps = top_ids[i][t], top_lp[i][t]
            if actual_ids[i][t] not in ids:
                # vLLM's entry holds the actual token too; sorted by rank it comes after the
                # top k, but a tie with the k-th puts it among them (rank counts ties).
                at = min(rank - 1, k)
                ids = ids[:at] + [actual_ids[i][t]] + ids[at:]
                lps = lps[:at] + [actual[i][t]] + lps[at:]
            seq_ids.append(ids)
            seq_lp.append(lps)
        all_logprobs.append(seq_lp)
        all_ids.append(seq_ids)
    return {
        "logprobs": all_logprobs,
        "logprob_token_ids": all_ids,
        "logprobs_b64": None,
        "token_ids_b64": None,
        "actual_logprobs_b64": None,
        "actual_token_ids_b64": None,
        "shape": None,
        "completion_lengths": None,
    }


def binary_body(result: SequenceLogprobs) -> dict[str, Any]:
    """`trl vllm-serve`'s `"binary"` answer: base64 of the little-endian arrays, float32
    logprobs and int32 token ids, `[B, T, k]` for the top k and `[B, T, 1]` for the actual
    tokens, with `shape` `[B, T, k]` and each sequence's completion length."""

    def b64(array: Any) -> str:
        return base64.b64encode(array.astype(array.dtype.newbyteorder("<")).tobytes()).decode("ascii")

    b, t, k = result.logprobs.shape
    return {
        "logprobs_b64": b64(result.logprobs),
        "token_ids_b64": b64(result.token_ids),
        "actual_logprobs_b64": b64(result.actual_logprobs[:, :, None]),
        "actual_token_ids_b64": b64(result.actual_token_ids[:, :, None]),
        "shape": [b, t, k],
        "completion_lengths": list(result.completion_lengths),
    }


def decode_binary(body: dict[str, Any]) -> dict[str, Any]:
    """A `binary_body` back into arrays (what a client does): `logprobs`, `token_ids` `[B, T, k]`,
    `actual_logprobs`, `actual_token_ids` `[B, T, 1]`, and `completion_lengths`."""
    import numpy as np

    b, t, k = body["shape"]

    def array(key: str, dtype: Any, width: int) -> Any:
        raw = base64.b64decode(body[key])
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(b, t, width)

    return {
        "logprobs": array("logprobs_b64", np.float32, k),
        "token_ids": array("token_ids_b64", np.int32, k),
        "actual_logprobs": array("actual_logprobs_b64", np.float32, 1),
        "actual_token_ids": array("actual_token_ids_b64", np.int32, 1),
        "completion_lengths": list(body["completion_lengths"]),
    }


__all__ = [
    "SequenceLogprobs",
    "TRL_TOP_LOGPROBS",
    "binary_body",
    "check_temperature",
    "decode_binary",
    "json_body",
    "sequence_spans",
]

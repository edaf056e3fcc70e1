"""The offline API: loglikelihoods on an existing `vllm.LLM`.

Every function also takes `words=` (True: each scored text's words, its runs of non-whitespace;
or one list of `(start, end)` character offsets per scored text) and `word_probability=`
(`"corrected"`, the default, or `"tokens"`): each `Score` then has `words`, a `WordScore` per
word (`vllm_loglik.words`; `docs/words.md`).

Each function validates all of its input first (a `ValueError` names the problem and nothing
is sent to the engine), then scores the whole batch with vLLM's prompt-logprobs path, which
computes log P(token | earlier tokens) at every prompt position, through the protocol of
`vllm_loglik.engine_requests` that the server uses too: one `LLM.generate` call per step of it.
When the `LLM` has prefix caching on (vLLM's default), a context shared by several
continuations or candidates is computed once (one more `generate` call warms it up), and only
the rest of each prompt is computed again; scored positions are always computed, so the
numbers equal those of the uncached path. The one generated token of each request is
discarded.

Every function takes `lora_request=` (a `vllm.lora.request.LoRARequest`, as `LLM.generate`
takes it; the `LLM` needs `enable_lora=True` and `lora_target_modules` without `lm_head`, see
`vllm_loglik.engine_requests.lora_scoring_problem`) to score under that adapter instead of the
base model. vLLM's prefix cache keys blocks by adapter, and a call's warm-up runs under the same
adapter as its scoring, so a context cached under one adapter is never read for another.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .engine_requests import (
    EngineRequest,
    corrected_words_problem,
    engine_max_logprobs,
    fast_paths,
    lora_scoring_problem,
    prefix_block_size,
    run_sync,
    score_spans,
)
from .reliance import report
from .runners import runner_of
from .jobs import Job, Scorer, check_top_logprobs
from .engine_output import ScoredRows
from .scoring import Score
from .spans import Span, excerpt
from .teacher import SequenceLogprobs, check_temperature, sequence_spans
from .words import WORD_PROBABILITIES, check_offsets

_scorers: weakref.WeakKeyDictionary[Any, Scorer] = weakref.WeakKeyDictionary()
_calls = itertools.count()


def scorer_for(llm: Any) -> Scorer:
    """The `Scorer` of `llm`'s tokenizer and context length (built once per `LLM`)."""
    scorer = _scorers.get(llm)
    if scorer is None:
        max_model_len = llm.llm_engine.model_config.max_model_len
        scorer = _scorers[llm] = Scorer(llm.get_tokenizer(), max_model_len)
        report("offline", fast_paths(llm.llm_engine.vllm_config))
    return scorer


def _with_words(
    scorer: Scorer, jobs: list[Job], words: Any, word_probability: str, name: str
) -> list[Job]:
    """`jobs` with their words laid on them (`Scorer.with_words`): `words` is True, or one list
    of `(start, end)` character offsets per scored text, in order."""
    if words is False or words is None:
        return jobs
    if word_probability not in WORD_PROBABILITIES:
        raise ValueError(
            f"word_probability must be one of {', '.join(WORD_PROBABILITIES)}, got {excerpt(word_probability)}"
        )
    corrected = word_probability == "corrected"
    if words is not True:
        words = _sequence(words, "words")
        if len(words) != len(jobs):
            raise ValueError(
                f"words must be True or hold one list of (start, end) offsets per scored text: "
                f"{len(words)} lists for {len(jobs)} texts"
            )
    out = []
    for i, job in enumerate(jobs):
        field = "words" if words is True else f"words[{i}]"
        try:
            spec = True if words is True else check_offsets(words[i], field)
            out.append(scorer.with_words(job, spec, corrected, field))
        except ValueError as e:
            raise ValueError(f"{name}[{i}]: {e}") from None
    return out


def run_jobs(
    llm: Any,
    jobs: list[Job],
    top_logprobs: int,
    use_tqdm: bool,
    lora_request: Any = None,
    words: Any = False,
    word_probability: str = "corrected",
    name: str = "requests",
    temperature: float = 1.0,
    arrays: bool = False,
) -> list[Score]:
    """Score `jobs` with the protocol of `vllm_loglik.engine_requests`, one `LLM.generate`
    call per batch of it, every request under `lora_request` (None: the base model), and
    return their scores in order; with `words`, each score's words too; with a `temperature`
    other than 1, of log softmax(logits / T); with `arrays`, each score's tokens as arrays
    (`Score.arrays`) instead of objects."""
    config = llm.llm_engine.vllm_config
    top_logprobs = check_top_logprobs(top_logprobs, cap=engine_max_logprobs(config.model_config))
    temperature = check_temperature(temperature)
    problem = lora_scoring_problem(config)
    if problem is not None:
        raise ValueError(problem)
    refusal = runner_of(config).temperature_refusal(temperature)
    if refusal is not None:
        raise ValueError(refusal)
    if temperature != 1 and words is not False and words is not None:
        raise ValueError("temperature cannot be combined with words: word scores are of the "
                         "model's own distribution")  # fmt: skip
    scorer = scorer_for(llm)
    jobs = _with_words(scorer, jobs, words, word_probability, name)
    corrected = any(job.words is not None and job.words.corrected for job in jobs)
    if corrected:
        problem = corrected_words_problem(config)
        if problem is not None:
            raise ValueError(problem)
        refusal = runner_of(config).words_refusal(
            top_logprobs, engine_max_logprobs(config.model_config)
        )
        if refusal is not None:
            raise ValueError(refusal)
    spans = [span for job in jobs for span in job.spans]
    scored = iter(
        run_spans(llm, spans, top_logprobs, use_tqdm, lora_request, corrected, temperature)
    )
    content = "arrays" if arrays else True
    return [
        scorer.finish(job, [next(scored) for _ in job.spans], top_logprobs, content)
        for job in jobs
    ]


def run_spans(
    llm: Any,
    spans: list[Span],
    top_logprobs: int,
    use_tqdm: bool = False,
    lora_request: Any = None,
    words: bool = False,
    temperature: float = 1.0,
) -> list[ScoredRows]:
    """The engine's rows of each span (checked input), by the protocol of
    `vllm_loglik.engine_requests`: one `LLM.generate` call per batch of it."""
    from vllm.inputs import TokensPrompt

    if not spans:
        return []
    block_size = prefix_block_size(llm.llm_engine.vllm_config)

    def run(batch: list[EngineRequest]) -> list[Any]:
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in batch]
        return llm.generate(
            prompts, [r.params for r in batch], use_tqdm=use_tqdm, lora_request=lora_request
        )

    protocol = score_spans(
        spans, top_logprobs, block_size, f"offline-{next(_calls)}", words=words,
        runner=runner_of(llm.llm_engine.vllm_config), temperature=temperature,
    )  # fmt: skip
    return run_sync(protocol, run)


def sequence_logprobs(
    llm: Any,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    *,
    top_logprobs: int = 0,
    temperature: float = 1.0,
    use_tqdm: bool = False,
    lora_request: Any = None,
) -> SequenceLogprobs:
    """Teacher or reference logprobs of the completion region of each token sequence: what
    TRL's `/get_sequence_logprobs/` answers (`vllm_loglik.teacher`), as numpy arrays.

    `sequences[i]` is a prompt and a completion of token ids, `prompt_lengths[i]` the prompt's
    length; row t of the result is position `prompt_lengths[i] + t`: the actual token's logprob
    (`actual_logprobs`) and rank, and the `top_logprobs` most likely tokens (`token_ids`,
    `logprobs`, best first), of log softmax(logits / `temperature`). Sequences that share a
    prompt (a GRPO group, DPO's chosen and rejected) are continuations of one context, computed
    once where prefix caching is on.

        >>> out = sequence_logprobs(llm, [prompt + chosen, prompt + rejected], [len(prompt)] * 2)
        >>> reference = np.where(out.ranks > 0, out.actual_logprobs, 0).sum(axis=1)  # no padding

    Raises `ValueError` naming `sequences[i]` or `prompt_lengths[i]`, a `top_logprobs` over the
    engine's `max_logprobs`, or a temperature other than 1 where the engine cannot apply it.
    """
    config = llm.llm_engine.vllm_config
    problem = lora_scoring_problem(config)
    if problem is not None:
        raise ValueError(problem)
    top_logprobs = check_top_logprobs(top_logprobs, cap=engine_max_logprobs(config.model_config))
    temperature = check_temperature(temperature)
    refusal = runner_of(config).temperature_refusal(temperature)
    if refusal is not None:
        raise ValueError(refusal)
    scorer = scorer_for(llm)
    spans = sequence_spans(
        sequences, prompt_lengths, scorer.tokens.check_ids, scorer.max_prompt_len,
        scorer.max_model_len,
    )  # fmt: skip
    scored = [s for s in spans if s is not None]
    rows = iter(run_spans(llm, scored, top_logprobs, use_tqdm, lora_request, False, temperature))
    return SequenceLogprobs.from_rows(
        sequences, prompt_lengths, spans, [next(rows) if s else None for s in spans], top_logprobs
    )


def _sequence(value: Any, name: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list")
    return value


def _jobs(items: Any, name: str, build: Callable[[Any], Job]) -> list[Job]:
    """`build(item)` for each item, all validated before anything reaches the engine; an
    error names the item, as `name[i]: ...`."""
    jobs = []
    for i, item in enumerate(_sequence(items, name)):
        try:
            jobs.append(build(item))
        except ValueError as e:
            raise ValueError(f"{name}[{i}]: {e}") from None
    return jobs


def _pair(item: Any) -> tuple[str, str]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError("must be a (context, continuation) pair")
    return item[0], item[1]


def loglikelihood(
    llm: Any,
    requests: Sequence[tuple[str, str]],
    *,
    top_logprobs: int = 0,
    use_tqdm: bool = False,
    lora_request: Any = None,
    words: bool | Sequence[Sequence[tuple[int, int]]] = False,
    word_probability: str = "corrected",
) -> list[Score]:
    """log P(continuation | context) for each `(context, continuation)` pair.

    The semantics of lm-evaluation-harness's `LM.loglikelihood`: trailing whitespace of the
    context moves to the continuation, `ctx = encode(context)`, `whole = encode(context +
    continuation)`, and the continuation's tokens are `whole[len(ctx):]`. Texts are encoded as
    vLLM encodes a prompt string (with the BOS token, where the tokenizer adds one); an empty
    context is the BOS token alone (EOS when there is no BOS).

    Each result unpacks as `(logprob, is_greedy)`:

        >>> ll, greedy = loglikelihood(llm, [("The capital of France is", " Paris")])[0]

    Raises `ValueError` for an empty continuation, or a context plus continuation longer than
    the model's context (`max_model_len - 1` tokens; use `loglikelihood_rolling` for long text).
    """
    scorer = scorer_for(llm)
    jobs = _jobs(requests, "requests", lambda item: scorer.pair(*_pair(item)))
    return run_jobs(
        llm, jobs, top_logprobs, use_tqdm, lora_request, words, word_probability, "requests"
    )


def loglikelihood_tokens(
    llm: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    top_logprobs: int = 0,
    use_tqdm: bool = False,
    lora_request: Any = None,
    words: bool | Sequence[Sequence[tuple[int, int]]] = False,
    word_probability: str = "corrected",
    temperature: float = 1.0,
    arrays: bool = False,
) -> list[Score]:
    """log P(continuation | context) for each `(context_ids, continuation_ids)` pair of token
    ids, each used exactly as given: lm-eval's `_loglikelihood_tokens`, and the way to score n
    sampled responses per prompt (best-of-n reranking, RL) with no detokenize-retokenize round
    trip. An empty context is the BOS token alone (EOS when there is no BOS). Contexts shared
    by several pairs are computed once where prefix caching is on.

        >>> prompt = llm.get_tokenizer().encode("Q: 2 + 2 =")
        >>> [a, b] = loglikelihood_tokens(llm, [(prompt, ids_a), (prompt, ids_b)])

    `temperature=T` scores under log softmax(logits / T) (a teacher's distribution; vLLM's own
    prompt logprobs ignore a request's temperature). `arrays=True` gives each `Score` its
    tokens as numpy arrays (`Score.arrays`: ids, logprobs, ranks, and the top `top_logprobs`)
    instead of an object per token: reference logprobs of many long responses.

    Raises `ValueError` for an empty continuation, an id outside the vocabulary (naming
    `requests[i]` and the id's place), or a pair longer than the model's context.
    """
    scorer = scorer_for(llm)
    jobs = _jobs(requests, "requests", lambda item: scorer.pair_ids(*_token_pair(item)))
    return run_jobs(
        llm, jobs, top_logprobs, use_tqdm, lora_request, words, word_probability, "requests",
        temperature, arrays,
    )  # fmt: skip


def _token_pair(item: Any) -> tuple[Sequence[int], Sequence[int]]:
    context, continuation = _pair(item)
    for value, name in ((context, "context"), (continuation, "continuation")):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"the {name} must be a list of token ids")
    if not continuation:
        raise ValueError("the continuation must not be empty: there would be no token to score")
    return context, continuation


def loglikelihood_rolling(
    llm: Any,
    texts: Sequence[str],
    *,
    top_logprobs: int = 0,
    use_tqdm: bool = False,
    lora_request: Any = None,
    words: bool | Sequence[Sequence[tuple[int, int]]] = False,
    word_probability: str = "corrected",
) -> list[Score]:
    """The total loglikelihood of each text, of any length, as lm-eval's `loglikelihood_rolling`.

    The text is encoded without special tokens and cut into lm-eval's disjoint rolling windows
    (`max_seq_len = max_model_len - 2`, the first window starting with the BOS token), so each
    token is predicted exactly once, the first one given BOS alone.
    """
    jobs = _jobs(texts, "texts", scorer_for(llm).rolling)
    return run_jobs(
        llm, jobs, top_logprobs, use_tqdm, lora_request, words, word_probability, "texts"
    )


def prompt_loglikelihood(
    llm: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    top_logprobs: int = 0,
    use_tqdm: bool = False,
    lora_request: Any = None,
    words: bool | Sequence[Sequence[tuple[int, int]]] = False,
    word_probability: str = "corrected",
) -> list[Score]:
    """Every token of each prompt except the first, as the hosted API's `loglikelihood: true`.

    A string is encoded as vLLM encodes a prompt string (so the first token is usually BOS,
    and every token of the text is scored); a list of token ids is used as it is.
    """
    jobs = _jobs(prompts, "prompts", scorer_for(llm).prompt)
    return run_jobs(
        llm, jobs, top_logprobs, use_tqdm, lora_request, words, word_probability, "prompts"
    )


def chat_loglikelihood(
    llm: Any,
    conversations: Sequence[Sequence[dict[str, Any]]],
    *,
    candidates: Sequence[Sequence[str | dict[str, Any]]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    top_logprobs: int = 0,
    use_tqdm: bool = False,
    lora_request: Any = None,
    words: bool | Sequence[Sequence[tuple[int, int]]] = False,
    word_probability: str = "corrected",
) -> list[Score] | list[list[Score]]:
    """The loglikelihood of the final message of each conversation under the chat template.

    Without `candidates`, the last message of each conversation is scored, and one `Score` per
    conversation is returned. With `candidates`, `candidates[i]` lists candidate final messages
    for `conversations[i]` (a string is an assistant message); each is appended to the
    conversation and scored, and a list of `Score`s per conversation is returned:

        >>> chat = [{"role": "user", "content": "Capital of France?"}]
        >>> [paris, rome] = chat_loglikelihood(llm, [chat], candidates=[["Paris", "Rome"]])[0]

    Only the final message's tokens are scored (with the template's end-of-turn markup after
    it); the template's header for that message is context.
    """
    scorer = scorer_for(llm)
    conversations = _sequence(conversations, "conversations")
    if candidates is not None:
        candidates = _sequence(candidates, "candidates")
        if len(candidates) != len(conversations):
            raise ValueError("candidates must hold one list of candidates per conversation")
    jobs: list[Job] = []
    shape: list[int] = []
    for i, conversation in enumerate(conversations):
        try:
            if candidates is None:
                jobs.append(scorer.chat(conversation, None, chat_template_kwargs))
                continue
            options = _sequence(candidates[i], f"candidates[{i}]")
            if not options:
                raise ValueError(f"candidates[{i}] must not be empty")
            shape.append(len(options))
            for option in options:
                jobs.append(scorer.chat(conversation, option, chat_template_kwargs))
        except ValueError as e:
            raise ValueError(f"conversations[{i}]: {e}") from None
    scores = run_jobs(
        llm, jobs, top_logprobs, use_tqdm, lora_request, words, word_probability, "texts"
    )
    if candidates is None:
        return scores
    grouped, at = [], 0
    for n in shape:
        grouped.append(scores[at : at + n])
        at += n
    return grouped

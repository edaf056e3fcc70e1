"""Scoring on vLLM's Model Runner V2 through its own prompt-scoring fields (vLLM 0.34 on).

Every GPU runs Model Runner V2, and from vLLM 0.34 on it is the only runner (the CPU build's
`CPUModelRunner` and V1's `GPUModelRunner` are gone). Its prompt scoring has public
`SamplingParams` fields that do what the V1 patch (`vllm_loglik.target_logprobs`) and the
warm-up protocol needed code of their own for, so on V2 this package uses them:

* `prompt_logprob_start = s`: prompt rows before `s` are not returned (their entries are
  `None`), and a request with `skip_reading_prefix_cache=False` reads the prefix cache up to
  `s`, rounded down to a block (`vllm/v1/request.py`, `Request.get_prefix_cache_hit_limit`),
  never past it. A span scored from position `p` sets `s = p - 1` (row `r` predicts token
  `r + 1`), so the continuations of one context read it from the cache and the row that
  predicts their first token is always computed. The list of entries keeps one per prompt
  position, so `vllm_loglik.engine_output` reads it as the V1 layout: position `p` at index `p`.
* `prompt_logprobs = k` gives each scored row's logprob, rank and top k, computed by V2's
  `PromptLogprobsWorker` (a fused logsumexp and ranks, no full log-softmax): nothing to patch.

What the fields cannot give is the word-boundary mass of corrected word scores
(`vllm_loglik.words`): log P_B, the log of the probability of every token in B at a row, a sum
over thousands of tokens. That is the one patch of this module, in the engine's worker:

* A request that wants words sends `prompt_logprob_token_ids` of shape `[rows, 2]`, every id
  `-1` (vLLM's padding, which it scores `-inf`), with `extra_args["vllm_loglik_words"]`.
* `install` wraps `compute_prompt_token_id_logprobs` (and the bookkeeping around it:
  `__init__`, `add_request`, `remove_request`) of V2's two prompt-logprob workers, the GPU
  runner's `PromptLogprobsWorker` (`vllm/v1/worker/gpu/sample/prompt_logprob.py`) and the
  standalone CPU runner's `CPUPromptLogprobsWorker` (`vllm/v1/worker/cpu/logprob.py`), which
  share this method and its state (`token_id_scores`, `prompt_logprob_start`), so one code path
  covers both. For the marked requests it fills column 0 of row `r` with log P_B of row `r`'s
  distribution and column 1 with that of row `r + 1` (for the last row, the distribution after
  the prompt, where the engine samples), chunk by chunk as vLLM fills its own scores; every
  other request goes through vLLM's method unchanged, in the same step.
* Where the patch does not run (switched off, code not verified), the columns come back
  `-inf`, and `vllm_loglik.engine_output` refuses them: never an uncorrected number.

Nor can the fields give prompt logprobs at a temperature (TRL's teacher distribution, log
softmax(logits / T)): V2's prompt logprobs are raw, whatever `SamplingParams.temperature` says.
So the patch also wraps `compute_prompt_logprobs` of both workers: for a step that holds a
marked request with `extra_args["vllm_loglik_temperature"]` (`engine_marks.TEMPERATURE`), the
`logits_fn` that vLLM's method calls, chunk by chunk over the step's rows, divides the rows of
that request by its T (each chunk is a view of the step's hidden states, so its first row is
known from its offset). Every other row is vLLM's own. A chunk that is not such a view makes the
temperature requests' rows NaN, which `vllm_loglik.engine_output` refuses: never a raw logprob
passed off as one at T.

The same wrapper spares the work that vLLM's method throws away, in a step that holds a marked
request: it computes the LM head over every row of the step and then keeps, per request that
wants prompt logprobs, the rows from its `prompt_logprob_start` on (`_kept_rows`). A warm-up's
whole context in the same step, or a cached context's rows before the start, cost a
[rows, vocabulary] product each for nothing; those rows are left at 0 instead (their results
are never read). `VLLM_LOGLIK_V2_SKIP_DROPPED_ROWS=0` turns this off.

Where this applies: the engine runs V2 (`use_v2_model_runner`, or a vLLM without V1), and the
vLLM code in `RELIES_ON` is that of a version it was verified on (`vllm_loglik.reliance`).
vLLM 0.32 and 0.33's V2 (a GPU's) lack the hit limit and, with `prompt_logprobs`, the start;
they keep the package's V2-layout reading (`vllm_loglik.engine_output`) and vLLM's own path.
"""

from __future__ import annotations

import logging
from typing import Any

from .engine_marks import (
    MARK,
    SOFTMAX_MODES,
    WORDS,
    boundary_mass,
    boundary_mask,
    may_patch,
    switched_off,
    temperature_of,
)
from .reliance import Reliance, checked

logger = logging.getLogger("vllm.loglik.v2_scoring")

#: The vLLM code that scoring on V2's fields relies on: the hit limit of the prefix cache, both
#: prompt-logprob workers (whose token-id method the word patch wraps, and whose
#: `compute_prompt_logprobs` the temperature patch wraps) and the chunking that calls the
#: latter's `logits_fn` on views of the step's hidden states, how the output processor lays out
#: rows before the start, and the containers it returns.
RELIES_ON = Reliance(
    "v2_scoring",
    (
        "vllm.v1.request:Request.get_prefix_cache_hit_limit",
        "vllm.v1.worker.gpu.sample.prompt_logprob:PromptLogprobsWorker",
        "vllm.v1.worker.gpu.sample.prompt_logprob:compute_prompt_logprobs_with_chunking",
        "vllm.v1.worker.cpu.logprob:CPUPromptLogprobsWorker",
        "vllm.v1.worker.cpu.logprob:compute_prompt_logprobs_with_chunking",
        "vllm.v1.engine.logprobs:LogprobsProcessor._update_prompt_logprobs",
        "vllm.logprobs",
    ),
    "V2's own prompt logprobs without its scoring fields: no prefix-cache reads, no corrected "
    "word scores",
)
#: The switch of the patch: word masses and temperature (on unless set to 0).
ENV = "VLLM_LOGLIK_V2_PATCH"
#: The worker classes whose `compute_prompt_token_id_logprobs` the patch wraps.
WORKERS = (
    ("vllm.v1.worker.gpu.sample.prompt_logprob", "PromptLogprobsWorker"),
    ("vllm.v1.worker.cpu.logprob", "CPUPromptLogprobsWorker"),
)
#: Set to 0 to let vLLM compute the LM head over the rows it drops, in steps that hold this
#: package's requests (`_kept_rows`).
SKIP_ENV = "VLLM_LOGLIK_V2_SKIP_DROPPED_ROWS"
#: Rows of logits computed at once for the masses (as vLLM's own `CHUNK_SIZE`).
CHUNK_ROWS = 1024

_installed = False
#: Set once a chunk of a step could not be placed in its hidden states (`_Scaled`): prompt
#: logprobs at a temperature are NaN in this process from then on.
_temperature_lost = False


def runs_v2(vllm_config: Any) -> bool:
    """Whether the engine runs Model Runner V2: vLLM 0.32/0.33 say so in the configuration
    (`use_v2_model_runner`); from 0.34 on there is no other runner."""
    return bool(getattr(vllm_config, "use_v2_model_runner", True))


def problem(vllm_config: Any) -> str | None:
    """Why scoring on V2's fields does not apply to this engine, or None where it does."""
    if not runs_v2(vllm_config):
        return "the engine runs the V1 model runner"
    return checked(RELIES_ON).reason()


def words_problem(vllm_config: Any) -> str | None:
    """Why the engine cannot compute word-boundary masses on V2 (or prompt logprobs at a
    temperature: the same patch), or None where it can."""
    if switched_off(ENV):
        return f"turned off ({ENV}=0)"
    mode = str(getattr(vllm_config.model_config, "logprobs_mode", "raw_logprobs"))
    if mode not in SOFTMAX_MODES:
        return f"logprobs_mode {mode} returns logits, not a log-softmax"
    return problem(vllm_config)


def scoring_fields(num_tokens: int, start: int, words: bool) -> dict[str, Any]:
    """The `SamplingParams` fields of a span of `num_tokens` prompt tokens scored from position
    `start` (>= 1): rows from `start - 1` on, and with `words` the `[rows, 2]` token ids (all
    padding) whose columns the patch fills with word-boundary masses."""
    fields: dict[str, Any] = {"prompt_logprob_start": start - 1}
    if words:
        import numpy as np

        fields["prompt_logprob_token_ids"] = np.full((num_tokens - start, 2), -1, dtype=np.int32)
    return fields


def install() -> None:
    """Wrap both V2 workers' `compute_prompt_token_id_logprobs` in this process (see the module
    docstring); a no-op where the code is not verified or the patch is switched off."""
    global _installed
    if _installed:
        return
    _installed = True
    if not may_patch(ENV, RELIES_ON, "V2 patch of token-id scores"):
        return
    import importlib

    for module, name in WORKERS:
        _wrap(getattr(importlib.import_module(module), name))


def _wrap(worker: type) -> None:
    original_init = worker.__init__
    original_add = worker.add_request
    original_remove = worker.remove_request
    original = worker.compute_prompt_token_id_logprobs
    original_logprobs = worker.compute_prompt_logprobs

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # The model's configuration, for B (the worker is made while the runner is, inside
        # vLLM's `set_current_vllm_config`; the worker itself keeps none).
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        self._vllm_loglik_model = None if config is None else config.model_config

    def add_request(self: Any, req_id: str, req_idx: int, sampling_params: Any) -> None:
        original_add(self, req_id, req_idx, sampling_params)
        extra = sampling_params.extra_args or {}
        ours = self.__dict__.setdefault("_vllm_loglik_words", {})
        if extra.get(MARK) and extra.get(WORDS) and req_id in self.token_id_scores:
            ours[req_id] = None
        else:
            ours.pop(req_id, None)
        temps = self.__dict__.setdefault("_vllm_loglik_temps", {})
        t = temperature_of(sampling_params)
        if t is not None:
            temps[req_id] = t
        else:
            temps.pop(req_id, None)
        marked = self.__dict__.setdefault("_vllm_loglik_marked", set())
        if extra.get(MARK):
            marked.add(req_id)
        else:
            marked.discard(req_id)

    def remove_request(self: Any, req_id: str) -> None:  # finished or aborted
        original_remove(self, req_id)
        self.__dict__.get("_vllm_loglik_words", {}).pop(req_id, None)
        self.__dict__.get("_vllm_loglik_temps", {}).pop(req_id, None)
        self.__dict__.get("_vllm_loglik_marked", set()).discard(req_id)

    def compute_prompt_logprobs(
        self: Any, logits_fn: Any, hidden_states: Any, input_batch: Any, all_token_ids: Any,
        num_computed_tokens: Any, prompt_lens: Any,
    ) -> dict[str, Any]:  # fmt: skip
        args = (all_token_ids, num_computed_tokens, prompt_lens)
        marked = self.__dict__.get("_vllm_loglik_marked")
        if not marked or not any(r in marked for r in input_batch.req_ids):
            return original_logprobs(self, logits_fn, hidden_states, input_batch, *args)
        temps = self.__dict__.get("_vllm_loglik_temps")
        rows = _temperature_rows(temps, input_batch) if temps else {}
        kept = None if switched_off(SKIP_ENV) else _kept_rows(self, input_batch, prompt_lens)
        if not rows and kept is None:
            return original_logprobs(self, logits_fn, hidden_states, input_batch, *args)
        global _temperature_lost
        scaled = _Scaled(logits_fn, hidden_states, rows, kept)
        out = original_logprobs(self, scaled, hidden_states, input_batch, *args)
        if scaled.lost and rows and not _temperature_lost:
            logger.warning("vllm-loglik: prompt logprobs at a temperature cannot be computed here")
            _temperature_lost = True
        if _temperature_lost:  # from then on (a prompt's earlier chunks too): no raw logprob
            for req_id in rows:  # passed off as one at T
                if req_id in out:
                    out[req_id].logprobs.fill_(float("nan"))
        return out

    def compute_prompt_token_id_logprobs(
        self: Any, logits_fn: Any, hidden_states: Any, input_batch: Any, prompt_lens: Any
    ) -> dict[str, Any]:
        ours = self.__dict__.get("_vllm_loglik_words")
        if not ours:
            return original(self, logits_fn, hidden_states, input_batch, prompt_lens)
        mine = {r: self.token_id_scores.pop(r) for r in ours if r in self.token_id_scores}
        try:
            out = original(self, logits_fn, hidden_states, input_batch, prompt_lens)
        finally:
            self.token_id_scores.update(mine)
        try:
            out.update(_word_masses(self, logits_fn, hidden_states, input_batch, prompt_lens, ours))
        except Exception as e:  # never the engine's death: the masses stay unset (-inf)
            logger.warning("vllm-loglik: no word-boundary masses (%s: %s)", type(e).__name__, e)
            for req_id in [r for r in ours if r in self.token_id_scores]:
                req = self.token_id_scores.pop(req_id)
                ours.pop(req_id, None)
                if req.scores is not None:
                    out[req_id] = req.scores.fill_(float("-inf"))
        return out

    __init__.__wrapped__ = original_init  # type: ignore[attr-defined]
    add_request.__wrapped__ = original_add  # type: ignore[attr-defined]
    remove_request.__wrapped__ = original_remove  # type: ignore[attr-defined]
    compute_prompt_token_id_logprobs.__wrapped__ = original  # type: ignore[attr-defined]
    compute_prompt_logprobs.__wrapped__ = original_logprobs  # type: ignore[attr-defined]
    worker.__init__ = __init__
    worker.add_request = add_request
    worker.remove_request = remove_request
    worker.compute_prompt_token_id_logprobs = compute_prompt_token_id_logprobs
    worker.compute_prompt_logprobs = compute_prompt_logprobs


def _temperature_rows(temps: dict[str, float], input_batch: Any) -> dict[str, tuple[int, int, float]]:
    """The step's rows (`[start, end)` of its hidden states) of each request with a temperature."""
    rows = {}
    loc = input_batch.query_start_loc_np
    for i, req_id in enumerate(input_batch.req_ids):
        t = temps.get(req_id)
        if t is not None:
            rows[req_id] = (int(loc[i]), int(loc[i + 1]), t)
    return rows


def _kept_rows(worker: Any, input_batch: Any, prompt_lens: Any) -> Any:
    """The rows of the step whose prompt logprobs vLLM's `compute_prompt_logprobs` keeps, as a
    bool array over the step's tokens (None when it keeps them all): its own selection, of the
    requests that want prompt logprobs in this step, from `prompt_logprob_start` on, less the
    last prompt row where the prompt ends in this step. It computes every other row too, and
    drops them: the LM head over a warm-up's whole context, or over a cached context's rows
    before the start."""
    import numpy as np

    idx = input_batch.idx_mapping_np
    lens = prompt_lens[idx]
    computed = input_batch.num_computed_prefill_tokens_np
    needs = worker.uses_prompt_logprobs[idx] & (computed < lens) & ~(lens < input_batch.prefill_len_np)
    chunked = computed + input_batch.num_scheduled_tokens < lens
    start = worker.prompt_logprob_start[idx]
    loc = input_batch.query_start_loc_np
    kept = np.zeros(int(input_batch.num_tokens), dtype=bool)
    for i in np.flatnonzero(needs):
        a = int(loc[i]) + max(int(start[i]) - int(computed[i]), 0)
        b = int(loc[i + 1]) - (0 if chunked[i] else 1)
        kept[a:b] = True
    return None if kept.all() else kept


class _Scaled:
    """vLLM's `logits_fn` for a step that holds this package's requests: the rows of a request
    with a temperature divided by its T (float32), and the rows that vLLM drops (`_kept_rows`)
    left at 0 instead of computed (their results are thrown away unread).

    vLLM calls it on slices of the step's hidden states (`compute_prompt_logprobs_with_chunking`
    takes `hidden_states[:num_tokens]` in chunks of rows): a slice's first row is its offset
    from the hidden states' storage. A chunk that is no such slice is computed whole and
    unscaled, and `lost` says so."""

    def __init__(self, logits_fn: Any, hidden_states: Any, rows: dict[str, tuple[int, int, float]],
                 kept: Any = None):  # fmt: skip
        import torch

        self.logits_fn = logits_fn
        self.base = hidden_states
        self.lost = False
        self.scale = None
        if rows:
            scale = torch.ones(hidden_states.shape[0], dtype=torch.float32, device=hidden_states.device)
            for start, end, t in rows.values():
                scale[start:end] = 1.0 / t
            self.scale = scale
        self.kept = kept

    def __call__(self, hidden: Any) -> Any:
        base = self.base
        row_bytes = base.stride(0) * base.element_size()
        delta = hidden.data_ptr() - base.data_ptr()
        n = hidden.shape[0]
        if (
            hidden.dim() != base.dim() or hidden.stride() != base.stride() or delta % row_bytes
            or not 0 <= delta // row_bytes <= base.shape[0] - n
        ):  # fmt: skip
            self.lost = True
            return self.logits_fn(hidden)
        first = delta // row_bytes
        kept = None if self.kept is None else self.kept[first : first + n]
        if kept is None or kept.all():
            logits = self.logits_fn(hidden)
        else:
            import numpy as np
            import torch

            at = torch.as_tensor(np.flatnonzero(kept), device=hidden.device)
            part = self.logits_fn(hidden.index_select(0, at)) if len(at) else None
            width = part.shape[-1] if part is not None else self.logits_fn(hidden[:1]).shape[-1]
            dtype = part.dtype if part is not None else torch.float32
            logits = torch.zeros((n, width), dtype=dtype, device=hidden.device)
            if part is not None:
                logits.index_copy_(0, at, part)
        if self.scale is None:
            return logits
        return logits.float() * self.scale[first : first + n, None]


def _word_masses(
    worker: Any, logits_fn: Any, hidden_states: Any, input_batch: Any, prompt_lens: Any,
    ours: dict[str, None],
) -> dict[str, Any]:  # fmt: skip
    """vLLM's loop of `compute_prompt_token_id_logprobs` for the marked requests, with column 0
    of row r holding log P_B of row r and column 1 that of row r + 1: the same chunks, the same
    skipping of decode steps and resumed requests, the same emission on the prompt's last
    chunk."""
    import torch

    out: dict[str, Any] = {}
    for i, req_id in enumerate(input_batch.req_ids):
        if req_id not in ours:
            continue
        req = worker.token_id_scores.get(req_id)
        if req is None:
            continue
        req_idx = input_batch.idx_mapping_np[i]
        prompt_len = int(prompt_lens[req_idx])
        start = int(worker.prompt_logprob_start[req_idx])
        chunk_start = int(input_batch.num_computed_prefill_tokens_np[i])
        chunk_end = chunk_start + int(input_batch.num_scheduled_tokens[i])
        if chunk_start >= prompt_len or prompt_len < input_batch.prefill_len_np[i]:
            worker.token_id_scores.pop(req_id, None)
            ours.pop(req_id, None)
            continue
        if req.scores is None:
            if chunk_start > start:
                worker.token_id_scores.pop(req_id, None)
                ours.pop(req_id, None)
                continue
            req.scores = torch.full_like(req.token_ids, float("nan"), dtype=torch.float32)
        # Unlike vLLM's own loop, the last prompt row counts: its mass is the last row's
        # column 1 (the distribution after the prompt).
        lo = max(start, chunk_start)
        hi = min(chunk_end, prompt_len)
        base = int(input_batch.query_start_loc_np[i]) - chunk_start
        rows = req.scores.shape[0]
        for a in range(lo, hi, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, hi)
            logits = logits_fn(hidden_states[base + a : base + b])
            mask = boundary_mask(worker._vllm_loglik_model, logits.device)
            mass = boundary_mass(logits, mask).to(torch.float32)
            own = slice(a - start, min(b - start, rows))
            req.scores[own, 0] = mass[: own.stop - own.start]
            # Row r's mass is also column 1 of row r - 1.
            prev_lo = max(a - start - 1, 0)
            prev_hi = b - start - 1
            req.scores[prev_lo:prev_hi, 1] = mass[prev_lo - (a - start - 1) :]
        if chunk_end >= prompt_len:
            out[req_id] = req.scores
            worker.token_id_scores.pop(req_id, None)
            ours.pop(req_id, None)
    return out

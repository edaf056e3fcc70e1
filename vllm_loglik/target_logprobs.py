"""Target-only prompt logprobs in the engine, for vllm-loglik's own requests.

vLLM has no extension point for how prompt logprobs are computed, so this module patches one
method, in the engine's worker process, and only there. What it replaces, in vLLM 0.32:

* `GPUModelRunner._get_prompt_logprobs_dict` (`vllm/v1/worker/gpu_model_runner.py`; the CPU
  build's `CPUModelRunner` inherits it), which, for every prompt position of every request
  that asks for prompt logprobs, calls `Sampler.compute_logprobs` (a float32 log-softmax over
  the whole vocabulary, `[positions, vocab]`, written and read back) and then
  `Sampler.gather_logprobs` (the target's logprob and rank, and the top k).

For a request marked by vllm-loglik (`SamplingParams.extra_args["vllm_loglik"]`, which
`engine_requests.scoring_params` sets), each scored position's three numbers come instead from
one compiled function over the logits (`_target_rows`): the target token's logprob
`logit[target] - logsumexp(logits)`, its rank `count(logits >= logit[target])` (vLLM's
`batched_count_greater_than`, ties included), and for `top_logprobs` k > 0 the top k logits
minus the same logsumexp. The logits are those vLLM computes (`model.compute_logits` over the
same rows), divided by the request's temperature where it has one (`engine_marks.TEMPERATURE`:
log softmax(logits / T), which vLLM's own path never gives), the log-softmax is never materialized, and the logits are taken in slices of rows
(`ROWS_ELEMENTS`) so that the extra memory of a long prompt stays bounded. Every other
request, of any other client, goes through vLLM's own method unchanged, in the same step.

Where it applies (`problem` says why not, and the caller falls back to vLLM's own path): a vLLM
whose code of the functions in `RELIES_ON` is that of a version it was verified on
(`vllm_loglik.fingerprints`: the source, not the version string, decides), the V1 model runner (V2, the GPU default, has its own
`vllm/v1/worker/gpu/sample/prompt_logprob.py`, which this does not touch), `logprobs_mode`
`raw_logprobs` or `processed_logprobs` (vLLM's default; the logit modes need no softmax), and
not turned off with `VLLM_LOGLIK_TARGET_LOGPROBS=0`. The engine's worker decides when the
general plugin is loaded (`install`) and logs why once when it does not patch; the API server
makes the same decision from the same configuration and counts each scoring request that falls
back on `vllm_loglik:fallbacks_total{reason="prompt_logprobs_path"}`.
"""

from __future__ import annotations

import logging
import os
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
from .engine_output import WORDS_ID as ENGINE_WORDS_ID
from .reliance import Reliance, checked

logger = logging.getLogger("vllm.loglik.target_logprobs")

__all__ = ["MARK", "WORDS", "install", "problem", "switched_off"]
# A marked request that wants word-boundary masses (`WORDS`) asks for its prompt logprobs with
# `k + 2` columns, of which the last two, with token id `WORDS_ID`, hold log P_B of the row's
# distribution and of the next row's (for the last prompt token: of the distribution after it,
# where the engine samples).
#: The token id of the two word-boundary columns (no token has it; vLLM's own path, which fills
#: every column with a real token, is told apart by it).
WORDS_ID = ENGINE_WORDS_ID
#: The vLLM code that the patch relies on: the method it replaces (and calls for everyone
#: else), the sampler functions whose numbers it reproduces, the tensors it fills, and the CPU
#: runner that must inherit the method as it is.
RELIES_ON = Reliance(
    "target_logprobs",
    (
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._get_prompt_logprobs_dict",
        "vllm.v1.sample.sampler:Sampler.compute_logprobs",
        "vllm.v1.sample.sampler:Sampler.gather_logprobs",
        "vllm.v1.sample.ops.logprobs:batched_count_greater_than",
        "vllm.v1.outputs:LogprobsTensors",
        "vllm.v1.worker.cpu_model_runner:CPUModelRunner",
    ),
    "vLLM's own prompt logprobs",
)
#: The fallback reason on the server's metrics.
FALLBACK_REASON = "prompt_logprobs_path"
#: Logits are read in slices of at most this many elements (rows x vocabulary): 16M float32
#: values, 64 MiB, whatever the prompt's length.
ROWS_ELEMENTS = 1 << 24
ENV = "VLLM_LOGLIK_TARGET_LOGPROBS"
#: A file to which the patched method appends the id of each request it computes (a trace for
#: tests and debugging: which requests took the target-only path).
TRACE_ENV = "VLLM_LOGLIK_TARGET_LOGPROBS_TRACE"

_installed = False
#: Why the patched method stopped taking the target-only path in this process, if it did.
_broken: str | None = None


def _disable(reason: str) -> None:
    global _broken
    _broken = reason
    logger.warning("vllm-loglik: vLLM's own prompt logprobs from now on in this engine (%s)", reason)


def problem(vllm_config: Any) -> str | None:
    """Why the target-only path does not apply to this engine, or None where it does."""
    if switched_off(ENV):
        return f"turned off ({ENV}=0)"
    if getattr(vllm_config, "use_v2_model_runner", True):
        return "the engine runs vLLM's V2 model runner, whose prompt logprobs it does not replace"
    mode = str(getattr(vllm_config.model_config, "logprobs_mode", "raw_logprobs"))
    if mode not in SOFTMAX_MODES:
        return f"logprobs_mode {mode} returns logits, which vLLM computes without a softmax"
    return checked(RELIES_ON).reason()


def install() -> None:
    """Patch the V1 model runner in this process (called by `vllm_loglik.runners.install`,
    the `vllm.general_plugins` entry point).

    vLLM loads general plugins in every process (the API server, the engine core, its
    workers); only the model runner's process uses the patch."""
    global _installed
    if _installed:
        return
    _installed = True
    # A vLLM without V1 (0.34 on) has nothing to patch here: V2 is `v2_scoring`'s.
    if not may_patch(ENV, RELIES_ON, "V1 patch of prompt logprobs"):
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._get_prompt_logprobs_dict

    def _get_prompt_logprobs_dict(self: Any, hidden_states: Any, num_scheduled_tokens: Any):
        ours = _our_requests(self) if not _broken else {}
        if not ours:
            return _unscaled(self, original(self, hidden_states, num_scheduled_tokens))
        everyone = self.num_prompt_logprobs
        self.num_prompt_logprobs = {r: k for r, k in everyone.items() if r not in ours}
        try:
            result = original(self, hidden_states, num_scheduled_tokens)
        finally:
            left = self.num_prompt_logprobs
            self.num_prompt_logprobs = everyone
            for req_id in list(everyone):
                if req_id not in ours and req_id not in left:
                    del everyone[req_id]  # completed by vLLM's own method
        try:
            result.update(_prompt_logprobs(self, hidden_states, num_scheduled_tokens, ours))
        except Exception as e:  # an unexpected shape: vLLM's own path, from now on
            _disable(f"{type(e).__name__}: {e}")
            self.num_prompt_logprobs = {r: k for r, k in everyone.items() if r in ours}
            try:
                result.update(original(self, hidden_states, num_scheduled_tokens))
            finally:
                left = self.num_prompt_logprobs
                self.num_prompt_logprobs = everyone
                for req_id in ours:
                    if req_id not in left:
                        everyone.pop(req_id, None)
        return _unscaled(self, result)

    _get_prompt_logprobs_dict.__wrapped__ = original  # type: ignore[attr-defined]
    GPUModelRunner._get_prompt_logprobs_dict = _get_prompt_logprobs_dict


def _unscaled(runner: Any, result: dict[str, Any]) -> dict[str, Any]:
    """`result`, where the patch has stopped (`_broken`): the rows of a request that asked for a
    temperature came from vLLM's own path, raw, so they are NaN, which `engine_output` refuses;
    never a raw logprob passed off as one at T."""
    if _broken:
        for req_id, tensors in result.items():
            state = runner.requests.get(req_id)
            if temperature_of(getattr(state, "sampling_params", None)) is not None:
                tensors.logprobs.fill_(float("nan"))
    return result


def _our_requests(runner: Any) -> dict[str, int]:
    """The marked requests among those that want prompt logprobs in this step, with their k
    (negative, `-(k + 1)`, for a request that wants word-boundary masses); none where the
    runner's logprobs mode needs vLLM's own path."""
    wanted = runner.num_prompt_logprobs
    if not wanted:
        return {}
    if runner.model_config.logprobs_mode not in SOFTMAX_MODES:
        return {}
    ours = {}
    for req_id, k in wanted.items():
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        if extra.get(MARK):
            ours[req_id] = -(k + 1) if extra.get(WORDS) else k
    return ours


def _prompt_logprobs(
    runner: Any, hidden_states: Any, num_scheduled_tokens: dict[str, int], ours: dict[str, int]
) -> dict[str, Any]:
    """vLLM's loop of `_get_prompt_logprobs_dict` for the marked requests, with the scoring
    step replaced by `_target_rows`: the same chunking, the same CPU tensors, the same
    bookkeeping of requests whose prefill is complete."""
    import torch
    from vllm.v1.outputs import LogprobsTensors

    out: dict[str, Any] = {}
    completed = []
    vocab = runner.model_config.get_vocab_size()
    for req_id, k in ours.items():
        words = k < 0
        k = -k - 1 if words else k
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:  # preempted in prefill
            continue
        request = runner.requests[req_id]
        if request.prompt_token_ids is None:
            continue
        num_prompt_tokens = len(request.prompt_token_ids)
        tensors = request.in_progress_prompt_logprobs_cpu
        if tensors is None:
            tensors = LogprobsTensors.empty_cpu(num_prompt_tokens - 1, k + 1)
            request.in_progress_prompt_logprobs_cpu = tensors
        start_idx = request.num_computed_tokens
        start_tok = start_idx + 1
        remaining = num_prompt_tokens - start_tok
        if num_tokens <= remaining:
            num_logits = num_tokens
        else:
            num_logits = remaining
            completed.append(req_id)
            out[req_id] = tensors
        offset = runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]].item()
        if num_logits <= 0:
            if words and req_id in completed and num_prompt_tokens >= 2:
                # A final chunk of the last token alone: the distribution after it.
                last = hidden_states[offset : offset + 1]
                mass = boundary_mass(runner.model.compute_logits(last), _boundary_mask(runner, last.device))
                tensors.logprobs[num_prompt_tokens - 2, k].copy_(mass[0], non_blocking=True)
            continue
        hidden = hidden_states[offset : offset + num_logits]
        logits_of = runner.model.compute_logits
        t = temperature_of(request.sampling_params)
        if t is not None:
            logits_of = _at_temperature(logits_of, t)
        targets = torch.tensor(
            request.prompt_token_ids[start_tok : start_tok + num_logits],
            dtype=torch.int64, device=hidden.device,
        )  # fmt: skip
        top = k - 2 if words else k
        mask = _boundary_mask(runner, hidden.device) if words else None
        ids, logprobs, ranks = _target_rows(logits_of, hidden, targets, top, vocab, mask)
        rows = slice(start_idx, start_idx + num_logits)
        if words:
            # Column k + 1: log P_B of the row's own distribution; column k + 2: of the next
            # row's, which is this chunk's next row, the previous chunk's last row's (its first
            # row here), and, on the final chunk, the distribution after the last token.
            b = logprobs[:, top + 1]
            after = torch.empty_like(b)
            after[:-1] = b[1:]
            if req_id in completed:
                last = hidden_states[offset + num_logits : offset + num_logits + 1]
                after[-1:] = boundary_mass(runner.model.compute_logits(last), mask)
            else:
                after[-1:] = float("nan")  # filled by the next chunk
            logprobs = torch.cat((logprobs, after[:, None]), dim=1)
            ids = torch.cat((ids, torch.full_like(ids[:, :1], WORDS_ID)), dim=1)
            if start_idx >= 1:
                tensors.logprobs[start_idx - 1, k].copy_(b[0], non_blocking=True)
        tensors.logprob_token_ids[rows].copy_(ids, non_blocking=True)
        tensors.logprobs[rows].copy_(logprobs, non_blocking=True)
        tensors.selected_token_ranks[rows].copy_(ranks, non_blocking=True)
    for req_id in completed:
        del runner.num_prompt_logprobs[req_id]
        runner.requests[req_id].in_progress_prompt_logprobs_cpu = None
    if out:
        runner._sync_device()
        trace = os.environ.get(TRACE_ENV)
        if trace:
            with open(trace, "a") as f:
                f.write("".join(f"{req_id}\n" for req_id in out))
    return out


def _at_temperature(compute_logits: Any, t: float) -> Any:
    """`compute_logits` divided by `t`, in float32 (the log-softmax is taken in float32)."""

    def scaled(hidden: Any) -> Any:
        return compute_logits(hidden).float() / t

    return scaled


def _target_rows(
    compute_logits: Any, hidden: Any, targets: Any, k: int, vocab: int, mask: Any = None
):
    """`(token ids, logprobs, ranks)` of each row as `Sampler.gather_logprobs` lays them out
    (column 0 the target, then the top k), from the logits of `hidden`; with `mask` (B, the
    tokens that begin a word), one more column: log P_B of the row (token id `WORDS_ID`). The
    logits are computed by vLLM's `compute_logits` a slice of rows at a time (all rows at once,
    as vLLM does, when they fit one slice of `ROWS_ELEMENTS`)."""
    import torch

    step = max(1, ROWS_ELEMENTS // max(vocab, 1))
    ids_out, lp_out, rank_out = [], [], []
    for at in range(0, hidden.shape[0], step):
        t = targets[at : at + step]
        logits = compute_logits(hidden[at : at + step])
        lp, rank, top_ids, top_lp = _fused(logits, t, k)
        ids = [t[:, None]] + ([top_ids] if k else [])
        lps = [lp] + ([top_lp] if k else [])
        if mask is not None:
            ids.append(torch.full_like(t[:, None], WORDS_ID))
            lps.append(boundary_mass(logits, mask)[:, None])
        ids_out.append(torch.cat(ids, dim=1).to(torch.int32))
        lp_out.append(torch.cat(lps, dim=1))
        rank_out.append(rank)
    if len(ids_out) == 1:
        return ids_out[0], lp_out[0], rank_out[0]
    return torch.cat(ids_out), torch.cat(lp_out), torch.cat(rank_out)


def _rows(x: Any, t: Any, k: int):
    import torch

    xf = x.float()
    lse = torch.logsumexp(xf, dim=-1, keepdim=True)
    target = xf.gather(-1, t[:, None])
    rank = (xf >= target).sum(-1)
    if k:
        top, top_ids = torch.topk(xf, k, dim=-1)
        return target - lse, rank, top_ids, top - lse
    return target - lse, rank, None, None


_compiled: Any = None


def _boundary_mask(runner: Any, device: Any):
    return boundary_mask(runner.model_config, device)


def _fused(logits: Any, targets: Any, k: int):
    """The target's logprob `[rows, 1]` and rank `[rows]`, and the top k ids and logprobs:
    `_rows` compiled with the platform's backend (as vLLM compiles `batched_count_greater_than`)
    into one kernel that reads the logits without writing a float32 copy of them. Where it
    cannot be compiled, `_rows` runs as it is (the same numbers, slower), and says so once."""
    global _compiled
    if _compiled is None:
        import torch
        from vllm.platforms import current_platform

        _compiled = torch.compile(_rows, dynamic=True, backend=current_platform.simple_compile_backend)
    if _compiled is not _rows:
        try:
            return _compiled(logits, targets, k)
        except Exception as e:  # no compiler for this device: run it eagerly from now on
            logger.warning("vllm-loglik: target logprobs run uncompiled (%s: %s)", type(e).__name__, e)
            _compiled = _rows
    return _rows(logits, targets, k)

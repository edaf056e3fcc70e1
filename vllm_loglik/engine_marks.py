"""What both runners' engine patches share: the mark of this package's requests, the switches,
and the word-boundary mass that corrected word scores need.

The V1 patch (`vllm_loglik.target_logprobs`) and the V2 one (`vllm_loglik.v2_scoring`) each
change one step of vLLM's worker for the requests that carry `MARK` in
`SamplingParams.extra_args`: both compute log P_B per row the same way, from the same B (the
tokens that begin a word: `vllm_loglik.words.boundary_ids`, found with the engine's own
tokenizer), and both divide the logits of a request with a `TEMPERATURE` by it. Nothing here is imported by vLLM or changes it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .reliance import Reliance, checked, vllm_version

logger = logging.getLogger("vllm.loglik")
#: The `SamplingParams.extra_args` key that marks a request as vllm-loglik's.
MARK = "vllm_loglik"
#: The `extra_args` key of a marked request that wants word-boundary masses (`vllm_loglik.words`).
WORDS = "vllm_loglik_words"
#: The `extra_args` key of a marked request whose prompt logprobs are those of the distribution
#: at a temperature T (a float > 0, not 1): log softmax(logits / T). vLLM's own prompt logprobs
#: ignore `SamplingParams.temperature` (they are raw logprobs, whatever it is).
TEMPERATURE = "vllm_loglik_temperature"
#: The `logprobs_mode`s whose prompt logprobs are a log-softmax (vLLM's default is the first);
#: the logit modes have none, so neither patch applies to them.
SOFTMAX_MODES = ("raw_logprobs", "processed_logprobs")

_masks: dict[int, Any] = {}


def switched_off(name: str) -> bool:
    """Whether the environment turns the switch `name` off (`0`, `false`, `no` or `off`)."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def may_patch(env: str, reliance: Reliance, what: str) -> bool:
    """Whether a runner's patch (`what`) goes in in this process: not switched off with `env`,
    and the vLLM code it relies on verified. Says why not: quietly where some of that code is
    missing (a vLLM of the other runner: 0.34 has no V1, 0.32 no V2 scoring fields), as a
    warning where it is all there but changed. The start-up line says what runs either way."""
    if switched_off(env):
        return False
    verdict = checked(reliance)
    if verdict.holds:
        return True
    gone = any(c.endswith("(missing)") for c in verdict.changed)
    (logger.info if gone else logger.warning)(
        "vllm-loglik on vLLM %s: no %s in this process (%s)", vllm_version(), what, verdict.reason()
    )
    return False


def temperature_of(params: Any) -> float | None:
    """The temperature of a marked request's prompt logprobs (`TEMPERATURE`), or None (1)."""
    extra = getattr(params, "extra_args", None) or {}
    if not extra.get(MARK):
        return None
    t = extra.get(TEMPERATURE)
    return float(t) if t is not None and t != 1 else None


def boundary_mass(logits: Any, mask: Any):
    """log P_B per row: the logsumexp of the logits of B less that of all (float32)."""
    import torch

    x = logits.float()
    if mask.shape[0] != x.shape[-1]:
        raise ValueError(f"a mask of {mask.shape[0]} tokens for {x.shape[-1]} logits")
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=-1) - torch.logsumexp(x, dim=-1)


def boundary_mask(model_config: Any, device: Any):
    """B (`vllm_loglik.words.boundary_ids`) over the model's logits, from the engine's own
    tokenizer, built once per process and model."""
    mask = _masks.get(id(model_config))
    if mask is None:
        from vllm.tokenizers import cached_tokenizer_from_config

        from .tokenization import Tokenization
        from .words import boundary_mask as words_mask

        tokenizer = cached_tokenizer_from_config(model_config)
        if tokenizer is None:
            raise ValueError("the engine has no tokenizer (skip_tokenizer_init) to find B with")
        width = model_config.get_vocab_size()
        mask = _masks[id(model_config)] = words_mask(Tokenization(tokenizer), width).to(device)
    return mask

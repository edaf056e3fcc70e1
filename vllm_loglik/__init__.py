"""Loglikelihood scoring for vLLM: offline on a `vllm.LLM`, and as a `vllm serve` plugin.

Offline::

    from vllm import LLM
    import vllm_loglik

    llm = LLM(model_path)
    ll, is_greedy = vllm_loglik.loglikelihood(llm, [("The capital of France is", " Paris")])[0]

Server: install this package and start `VLLM_PLUGINS=loglikelihood vllm serve MODEL`; then
`/v1/completions` and `/v1/chat/completions` accept a `loglikelihood` field (see the README).
"""

from .jobs import Job, Scorer
from .offline import (
    chat_loglikelihood,
    loglikelihood,
    loglikelihood_rolling,
    loglikelihood_tokens,
    prompt_loglikelihood,
    sequence_logprobs,
)
from .scoring import Score, TokenScore, TopLogprob
from .teacher import SequenceLogprobs

__all__ = [
    "Job",
    "Score",
    "Scorer",
    "SequenceLogprobs",
    "TokenScore",
    "TopLogprob",
    "chat_loglikelihood",
    "loglikelihood",
    "loglikelihood_rolling",
    "loglikelihood_tokens",
    "prompt_loglikelihood",
    "sequence_logprobs",
]
__version__ = "0.1.0"

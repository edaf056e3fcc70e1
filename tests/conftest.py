"""Shared fixtures: one demo model on disk, one real vLLM engine, one transformers reference.

Engines take 20-30 s to start on the CPU, so each is built once per test session.
"""

from __future__ import annotations

import os

import pytest

# Each engine reserves this much KV cache (GiB); vLLM's CPU default of 92% of NUMA node 0
# fails once a second engine or a server is running.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

#: Small on purpose: rolling texts longer than three windows stay short.
MAX_MODEL_LEN = 128


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    from vllm_loglik.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def llm(model_path):
    from vllm import LLM

    engine = LLM(
        model_path,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        enforce_eager=True,
        seed=0,
    )
    yield engine
    del engine


class Reference:
    """A plain transformers forward pass: what every vLLM number is checked against."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def token_logprobs(self, ids: list[int]) -> tuple[list[float], list[int]]:
        """log P(ids[i] | ids[:i]) and the argmax token at each position i >= 1."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[1:])
        picked = logprobs.gather(1, target[:, None])[:, 0]
        return picked.tolist(), logprobs.argmax(dim=-1).tolist()

    def score(self, ids: list[int], start: int) -> tuple[list[float], bool]:
        """Per-token logprobs of ids[start:], and whether each is the argmax."""
        lps, argmax = self.token_logprobs(ids)
        lps, argmax = lps[start - 1 :], argmax[start - 1 :]
        return lps, all(a == t for a, t in zip(argmax, ids[start:], strict=True))


@pytest.fixture(scope="session")
def ref(model_path):
    return Reference(model_path)

"""Teacher and reference logprobs for post-training: TRL's `/get_sequence_logprobs/` request.

A GRPO group (one prompt, several sampled completions) and a DPO pair (chosen, rejected) are
sent as token sequences; the server scores each completion region under the served model (the
teacher, or the frozen reference), computing each shared prompt once, and answers in TRL's
binary format: base64 float32/int32 arrays.

    python examples/teacher_logprobs.py [--base-url http://127.0.0.1:8000/v1] [--temperature 1.0]
"""

import os

import httpx
import numpy as np
from _common import connect

from vllm_loglik.teacher import decode_binary

client, model, args = connect(__doc__, {"--temperature": "1.0", "--top-logprobs": "5"})
server = args.base_url.removesuffix("/v1")
key = os.environ.get("OPENAI_API_KEY")
headers = {"Authorization": f"Bearer {key}"} if key else {}


def tokens(text: str, special: bool) -> list[int]:
    """The server's own tokenizer, through vLLM's `/tokenize`."""
    r = httpx.post(f"{server}/tokenize", json={"model": model, "prompt": text,
                                             "add_special_tokens": special}, headers=headers)  # fmt: skip
    r.raise_for_status()
    return r.json()["tokens"]


prompt = tokens("Question: What is the capital of France?\nAnswer:", True)
completions = [" Paris.", " The capital of France is Paris.", " Lyon, I think.", " I do not know."]
sequences = [prompt + tokens(c, False) for c in completions]

r = httpx.post(
    f"{server}/get_sequence_logprobs/", headers=headers, timeout=120,
    json={"sequences": sequences, "prompt_lengths": [len(prompt)] * len(sequences),
          "top_logprobs": int(args.top_logprobs), "temperature": float(args.temperature),
          "response_format": "binary"},
)  # fmt: skip
r.raise_for_status()
out = decode_binary(r.json())
b, t, k = out["logprobs"].shape
print(f"{b} sequences, {t} completion rows at most, top {k}; answer {len(r.content):,} bytes")
for i, (text, n) in enumerate(zip(completions, out["completion_lengths"], strict=True)):
    actual = out["actual_logprobs"][i, :n, 0]
    # What a trainer reads: the sequence's reference logprob (DPO), and per token how much of
    # the teacher's top-k mass the sampled token got (distillation).
    agree = np.mean(out["token_ids"][i, :n, 0] == out["actual_token_ids"][i, :n, 0])
    print(f"{text!r:40} logprob {actual.sum():9.3f}  mean {actual.mean():7.3f}  "
          f"teacher's top-1 agrees on {agree:.0%} of {n} tokens")

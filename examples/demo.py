"""`make demo`: every scoring mode on the built-in demo model, offline and through `vllm serve`.

1. Builds the demo model (a byte-level BPE tokenizer and a seeded random 2-layer Llama) in
   `.cache/demo-model`.
2. Scores with the offline API on a `vllm.LLM`: a multiple-choice question, a rolling
   perplexity, a chat reply ranking, and the most surprising tokens of a prompt.
3. Starts `vllm serve` with the plugin (`VLLM_PLUGINS=loglikelihood`), asks the same through the
   `openai` client with `extra_body={"loglikelihood": ...}`, and checks the numbers agree.

The model's weights are random, so which answer "wins" means nothing; the point is the
plumbing, and that offline and server give the same numbers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# vLLM's CPU engine keeps a core for the front-end by default; scoring is engine-bound, and with
# every core on the model it runs faster, offline and served (see the README's Performance).
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".cache" / "demo-model"
MAX_MODEL_LEN = 256

QUESTION = "Question: Which planet is known as the red planet?\nAnswer:"
CHOICES = [" Mars", " Venus", " Jupiter", " Saturn"]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
REPLIES = ["The capital of France is Paris.", "Rome, of course.", "I do not know."]


def offline(model: str) -> dict:
    from vllm import LLM

    import vllm_loglik
    from vllm_loglik.testing import default_corpus

    # KV blocks of 32 tokens (the CPU default is 128): a context shared by several continuations
    # is computed once, and only its last partial block again per continuation.
    llm = LLM(
        model, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
        block_size=32,
    )  # fmt: skip

    print("\n== Offline: multiple choice (lm-eval loglikelihood) ==")
    mc = vllm_loglik.loglikelihood(llm, [(QUESTION, c) for c in CHOICES])
    for choice, score in zip(CHOICES, mc, strict=True):
        ll, greedy = score
        print(f"  {choice!r:12} logprob {ll:9.4f}  tokens {score.num_tokens}  greedy {greedy}")
    best = max(range(len(CHOICES)), key=lambda i: mc[i].logprob)
    print(f"  most likely answer: {CHOICES[best]!r}")

    print("\n== Offline: rolling loglikelihood of a long text ==")
    text = default_corpus()
    (rolling,) = vllm_loglik.loglikelihood_rolling(llm, [text])
    print(f"  {len(text)} characters, {rolling.num_tokens} tokens, logprob {rolling.logprob:.2f}, "
          f"perplexity {rolling.perplexity:.1f}")

    print("\n== Offline: ranking chat replies (last message under the chat template) ==")
    [replies] = vllm_loglik.chat_loglikelihood(llm, [CHAT], candidates=[REPLIES])
    for reply, score in zip(REPLIES, replies, strict=True):
        print(f"  {reply!r:36} logprob {score.logprob:9.4f}  per token "
              f"{score.logprob / score.num_tokens:7.4f}")

    print("\n== Offline: the most surprising tokens of a prompt ==")
    (prompt,) = vllm_loglik.prompt_loglikelihood(llm, ["The quick brown fox jumps over the lazy dog."])
    for tok in sorted(prompt.tokens, key=lambda t: t.logprob)[:3]:
        print(f"  {tok.token!r:10} logprob {tok.logprob:8.4f}  rank {tok.rank}")
    # Stop the engine now: left to the interpreter's exit, its teardown can abort the process.
    llm.llm_engine.engine_core.shutdown()
    return {"mc": mc, "replies": replies, "prompt": prompt, "rolling": rolling, "text": text}


def online(results: dict, url: str) -> None:
    import openai

    from vllm_loglik.protocol import entries

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    worst = 0.0

    response = client.completions.create(
        model="demo", prompt=QUESTION, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": CHOICES}},
    )  # fmt: skip
    print("  multiple choice, one request:")
    for entry, score in zip(entries(response.choices[0]), results["mc"], strict=True):
        worst = max(worst, abs(entry.logprob - score.logprob))
        print(f"    {entry.text!r:12} logprob {entry.logprob:9.4f}  greedy {entry.is_greedy}")

    response = client.completions.create(
        model="demo", prompt=results["text"], max_tokens=0,
        extra_body={"loglikelihood": {"scope": "rolling", "content": False}},
    )  # fmt: skip
    (entry,) = entries(response.choices[0])
    # A sum over thousands of tokens: compared per token, as everywhere.
    worst = max(worst, abs(entry.logprob - results["rolling"].logprob) / entry.num_tokens)
    print(f"  rolling perplexity of the same text, one request (compact entry): "
          f"{entry.num_tokens} tokens, logprob {entry.logprob:.2f}")

    response = client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=0,
        extra_body={"loglikelihood": {"continuations": REPLIES}},
    )  # fmt: skip
    print("  chat replies, one request:")
    for entry, score in zip(entries(response.choices[0]), results["replies"], strict=True):
        worst = max(worst, abs(entry.logprob - score.logprob))
        print(f"    {entry.text!r:36} logprob {entry.logprob:9.4f}")

    response = client.completions.create(
        model="demo", prompt="The quick brown fox jumps over the lazy dog.", max_tokens=5,
        temperature=0, logprobs=1, extra_body={"loglikelihood": True},
    )  # fmt: skip
    (entry,) = entries(response.choices[0])
    worst = max(worst, abs(entry.logprob - results["prompt"].logprob))
    print(f"  prompt logprob {entry.logprob:.4f} over {entry.num_tokens} tokens, and generated "
          f"{response.choices[0].text!r} with its own logprobs "
          f"{[round(x, 3) for x in response.choices[0].logprobs.token_logprobs]}")

    print(f"\nlargest |offline - server| difference (per token for the rolling text): {worst:.2e}")
    if worst > 1e-4:
        sys.exit("FAIL: the server and the offline API disagree")
    print("OK: the server and the offline API agree")


def main() -> None:
    from vllm_loglik.testing import ApiServer, build_tiny_model

    model = str(build_tiny_model(MODEL_DIR))
    print(f"demo model: {model}")
    results = offline(model)
    args = ["--served-model-name", "demo", "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--block-size", "32"]  # fmt: skip
    print(f"\n== Server: VLLM_PLUGINS=loglikelihood python -m vllm.entrypoints.openai.api_server "
          f"--model {model} {' '.join(args)} ==")
    with ApiServer(model, args, ROOT / ".cache" / "demo-server.log") as server:
        online(results, server.url)


if __name__ == "__main__":
    main()

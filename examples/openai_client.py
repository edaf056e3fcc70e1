"""The `loglikelihood` field from the `openai` client, on completions and on chat.

    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]
"""

from _common import connect

client, model, _ = connect(__doc__)

# The hosted API's boolean field: the log-probability of every prompt token but the first.
response = client.completions.create(
    model=model, prompt="The capital of France is Paris.", max_tokens=0,
    extra_body={"loglikelihood": True},
)  # fmt: skip
(entry,) = response.choices[0].loglikelihood  # plain dicts; vllm_loglik.protocol parses them
print(f"completions: {entry['num_tokens']} tokens, logprob {entry['logprob']:.3f}")
for token in entry["content"][:5]:
    print(f"  {token['token']!r:>12} {token['logprob']:8.3f}  rank {token['rank']}")

# Chat: the conversation rendered by the server's chat template, scored the same way.
response = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=0, extra_body={"loglikelihood": True},
)  # fmt: skip
(entry,) = response.choices[0].loglikelihood
print(f"chat: {entry['num_tokens']} tokens of the rendered prompt, logprob {entry['logprob']:.3f}")

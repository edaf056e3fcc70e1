"""The most surprising tokens of a text, with what the model expected instead.

    python examples/surprising_tokens.py [--base-url http://127.0.0.1:8000/v1]
"""

from _common import connect

from vllm_loglik.protocol import entries

client, model, _ = connect(__doc__)
text = "The quick brown fox jumps over the lazy dog. The cat sat on the mat."

response = client.completions.create(
    model=model, prompt=text, max_tokens=0,
    extra_body={"loglikelihood": {"top_logprobs": 3}},
)  # fmt: skip
(entry,) = entries(response.choices[0])
for token in sorted(entry.content, key=lambda t: t.logprob)[:5]:
    expected = ", ".join(f"{a.token!r} {a.logprob:.2f}" for a in token.top_logprobs)
    print(f"{token.token!r:>10} logprob {token.logprob:7.2f} rank {token.rank:5d}; expected: {expected}")

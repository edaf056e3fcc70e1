"""Multiple choice: which answer is the most likely? One request scores all of them, and the
server computes the shared question once.

    python examples/multiple_choice.py [--base-url http://127.0.0.1:8000/v1]
"""

from _common import connect

from vllm_loglik.protocol import entries

client, model, _ = connect(__doc__)
question = "Question: Which planet is known as the red planet?\nAnswer:"
choices = [" Mars", " Venus", " Jupiter", " Saturn"]

response = client.completions.create(
    model=model, prompt=question, max_tokens=0,
    extra_body={"loglikelihood": {"continuations": choices, "content": False}},
)  # fmt: skip
scores = entries(response.choices[0])
for choice, score in zip(choices, scores, strict=True):
    # lm-evaluation-harness's acc uses the sum; acc_norm divides it by the choice's length.
    print(f"{choice!r:12} logprob {score.logprob:9.3f}  per byte "
          f"{score.logprob / len(choice.encode()):7.3f}  greedy {score.is_greedy}")
best = max(range(len(choices)), key=lambda i: scores[i].logprob)
print(f"most likely: {choices[best]!r}")

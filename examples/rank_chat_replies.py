"""Rank candidate replies in a chat: each is scored as the assistant's next message under the
server's chat template, end-of-turn included.

    python examples/rank_chat_replies.py [--base-url http://127.0.0.1:8000/v1]
"""

from _common import connect

from vllm_loglik.protocol import entries

client, model, _ = connect(__doc__)
conversation = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
replies = ["The capital of France is Paris.", "Rome, of course.", "I do not know."]

response = client.chat.completions.create(
    model=model, messages=conversation, max_tokens=0,
    extra_body={"loglikelihood": {"continuations": replies, "content": False}},
)  # fmt: skip
ranked = sorted(zip(entries(response.choices[0]), replies), key=lambda p: -p[0].logprob / p[0].num_tokens)
for rank, (score, reply) in enumerate(ranked, start=1):
    print(f"{rank}. {reply!r:36} logprob {score.logprob:9.3f}, per token "
          f"{score.logprob / score.num_tokens:7.3f}")

"""Row 12: n sampled responses of one prompt, scored as token-id continuations.

What best-of-n reranking and RL pipelines do: one prompt, n responses given as token ids.
`vllm_loglik.loglikelihood_tokens` computes the prompt once (a warm-up request fills the prefix
cache) and each response after it; the baseline is vLLM's native path, one `prompt_logprobs=0`
request per prompt + response, in one `generate` call on the same `LLM`. The prefix cache is
emptied before each timed run, and both sides are warmed up the same way first.
"""

from __future__ import annotations

import random
import time


def token_responses(model: str, prompt_len: int, responses: int, response_len: int,
                    dtype: str, repeats: int) -> dict:  # fmt: skip
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm_loglik

    llm = LLM(
        model, dtype=dtype, max_model_len=prompt_len + response_len + 64, enforce_eager=True,
        seed=0, block_size=32,
    )  # fmt: skip
    vocab = len(llm.get_tokenizer())

    def sample(seed: int) -> tuple[list[int], list[list[int]]]:
        rng = random.Random(seed)
        prompt = [llm.get_tokenizer().bos_token_id] + [rng.randrange(3, vocab) for _ in range(prompt_len - 1)]
        return prompt, [[rng.randrange(3, vocab) for _ in range(response_len)] for _ in range(responses)]

    prompt, outs = sample(0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def ours(p: list[int], rs: list[list[int]]) -> list:
        return vllm_loglik.loglikelihood_tokens(llm, [(p, r) for r in rs])

    def native(p: list[int], rs: list[list[int]]) -> list:
        return llm.generate([TokensPrompt(prompt_token_ids=p + r) for r in rs], params, use_tqdm=False)

    warm_prompt, warm_outs = sample(1)
    ours(warm_prompt, warm_outs)
    native(warm_prompt, warm_outs)
    t: dict[str, list[float]] = {"ours": [], "native": []}
    results: dict[str, list] = {}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("native", native)):
            llm.reset_prefix_cache()
            start = time.perf_counter()
            results[name] = fn(prompt, outs)
            t[name].append(time.perf_counter() - start)
    diff = 0.0
    for score, out in zip(results["ours"], results["native"], strict=True):
        rows = out.prompt_logprobs[prompt_len:]
        for token, row in zip(score.tokens, rows, strict=True):
            diff = max(diff, abs(token.logprob - row[token.token_id].logprob))
    return {**{k: min(v) for k, v in t.items()}, "max_abs_diff": diff,
            "prompt_len": prompt_len, "responses": responses, "response_len": response_len}  # fmt: skip


def table_rows(results: dict, size: object) -> list[tuple[str, str, float, str, str]]:
    if "token_responses" not in results:
        return []
    r = results["token_responses"]
    return [(
        "12. token-id responses: `loglikelihood_tokens` vs native `prompt_logprobs` per response",
        "0 reserved, block 32", r["native"] / r["ours"], "≥ 3×",
        f"{r['native']:.2f} s vs {r['ours']:.2f} s (one {r['prompt_len']}-token prompt, "
        f"{r['responses']} responses of {r['response_len']} tokens; largest difference "
        f"{r['max_abs_diff']:.1e})",
    )]  # fmt: skip

"""Rows 3 and 7: the offline API against transformers and against vLLM's native path.

3. `vllm_loglik.prompt_loglikelihood` against transformers forward + log_softmax + gather
   (batch 8) and vLLM's native prompt logprobs and plain prefill, on the same tokens;
7. multiple choice: `vllm_loglik.loglikelihood` on an `LLM` with prefix caching on and
   `block_size=32`, against one native `prompt_logprobs` prompt per pair in one `generate` call.
"""

from __future__ import annotations

import time

from common import RESERVED, Size, questions, token_prompts

def offline_rows(model: str, size: Size, dtype: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm_loglik

    prompts = token_prompts(model, size.prompts, size.prompt_len)
    llm = LLM(
        model, dtype=dtype, max_model_len=size.prompt_len + 16, enforce_eager=True,
        enable_prefix_caching=False, seed=0,
    )  # fmt: skip
    hf = LlamaForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def transformers_scores() -> None:
        with torch.no_grad():
            for i in range(0, len(prompts), 8):
                batch = torch.tensor(prompts[i : i + 8])
                logits = hf(batch).logits[:, :-1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                logprobs.gather(2, batch[:, 1:, None]).sum()

    def ours() -> None:
        vllm_loglik.prompt_loglikelihood(llm, prompts)

    def native() -> None:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def prefill() -> None:
        params = SamplingParams(max_tokens=1)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    ours()  # warm-up
    transformers_scores()
    t: dict[str, list[float]] = {"transformers": [], "ours": [], "native": [], "prefill": []}
    for _ in range(size.repeats):
        for name, fn in (
            ("transformers", transformers_scores), ("ours", ours), ("native", native),
            ("prefill", prefill),
        ):  # fmt: skip
            start = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in t.items()}

def offline_multiple_choice(model: str, size: Size, dtype: str) -> dict:
    """Row 7: `vllm_loglik.loglikelihood` on an `LLM` with prefix caching on (vLLM's default)
    and `block_size=32`, against one native `prompt_logprobs` prompt per pair in one `generate`
    call on the same `LLM`. The prefix cache is emptied before each timed run."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm_loglik
    from vllm_loglik.offline import scorer_for

    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(
        model, dtype=dtype, max_model_len=size.context_len + 64, enforce_eager=True, seed=0,
        block_size=32,
    )  # fmt: skip
    items = questions(model, size, size.offline_questions)
    pairs = [(tok.decode(ctx[1:]), c) for ctx, conts in items for c in conts]
    scorer = scorer_for(llm)  # the same token ids in both paths
    prompts = [
        TokensPrompt(prompt_token_ids=scorer.pair(*pair).spans[0].prompt_token_ids)
        for pair in pairs
    ]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def ours() -> None:
        vllm_loglik.loglikelihood(llm, pairs)

    def native() -> None:
        llm.generate(prompts, params, use_tqdm=False)

    warm_up = [(tok.decode(ctx[1:]), c) for ctx, conts in questions(model, size, 1, seed=3) for c in conts]
    vllm_loglik.loglikelihood(llm, warm_up)  # other contexts: the cache is reset anyway
    t: dict[str, list[float]] = {"ours": [], "native": []}
    for _ in range(size.repeats):
        for name, fn in (("ours", ours), ("native", native)):
            llm.reset_prefix_cache()
            start = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in t.items()}


def table_rows(r: dict, size: Size) -> list[tuple[str, str, float, str, str]]:
    rows = []
    for reserved in size.settings if "offline" in r else ():
        off = r["offline"][str(reserved)]
        rows.append(
            ("3. offline: speed-up over transformers", f"{reserved} reserved",
             off["transformers"] / off["ours"], "≥ 1.0×",
             f"transformers {off['transformers']:.2f} s, ours {off['ours']:.2f} s (vLLM: native "
             f"prompt logprobs {off['native']:.2f} s, plain prefill {off['prefill']:.2f} s)")
        )  # fmt: skip
    if "offline_multiple_choice" in r:
        omc = r["offline_multiple_choice"]
        rows.append(
            ("7. offline multiple choice: speed-up over one prompt per pair",
             f"{RESERVED} reserved, block 32", omc["native"] / omc["ours"], "≥ 4×",
             f"{omc['native']:.2f} s vs {omc['ours']:.2f} s ({size.offline_questions} questions × 4 "
             f"continuations, {size.context_len}-token contexts)")
        )  # fmt: skip
    return rows

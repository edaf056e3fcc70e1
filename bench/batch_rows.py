"""Row 9: the batch CLI's engine loop against the offline API called once on the same jobs."""

from __future__ import annotations

import json
import time

from common import RESERVED, WORDS, Size, token_prompts

def batch_lines(model: str, size: Size) -> list[str]:
    """`size.batch_lines` mixed request bodies, as JSON lines: whole prompts, multiple choice,
    rolling documents longer than the context, chat last messages and chat candidates."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = token_prompts(model, 1, 40 * size.prompt_len, seed=5)[0][1:]
    longest = size.prompt_len // 2  # room for a chat template and continuations

    def text(at: int, length: int) -> str:
        at %= len(ids) - length
        return tok.decode(ids[at : at + length])

    lines = []
    for i in range(size.batch_lines):
        piece = text(i * 37, 8 + i % (longest - 8))
        kind = i % 5
        if kind == 0:
            body = {"prompt": piece, "loglikelihood": True}
        elif kind == 1:
            body = {"prompt": piece, "loglikelihood": {"continuations": WORDS[:4]}}
        elif kind == 2:
            body = {"prompt": text(i * 53, size.prompt_len * 2), "loglikelihood": {"scope": "rolling"}}
        elif kind == 3:
            body = {"messages": [{"role": "user", "content": piece}], "loglikelihood": True}
        else:
            body = {"messages": [{"role": "user", "content": piece}],
                    "loglikelihood": {"continuations": ["Yes.", "No.", piece[:40] or "Maybe."]}}  # fmt: skip
        lines.append(json.dumps(dict(body, id=i)))
    return lines

def offline_batch(model: str, size: Size, dtype: str) -> dict:
    """Row 9: `vllm-loglik score`'s engine loop (`vllm_loglik.batch.run_engine`, what the CLI
    runs once its engine is up) against the offline API's `run_jobs` called once on the same
    jobs, on one `LLM` (prefix caching on, `block_size=32`); scored tokens per second."""
    import io

    from vllm import LLM

    from vllm_loglik import batch
    from vllm_loglik.offline import run_jobs, scorer_for

    llm = LLM(
        model, dtype=dtype, max_model_len=size.prompt_len + 16, enforce_eager=True, seed=0,
        block_size=32,
    )  # fmt: skip
    lines = batch_lines(model, size)
    scorer = scorer_for(llm)
    works = [batch.parse_line(scorer, line, n, False) for n, line in enumerate(lines, start=1)]
    assert all(w.error is None for w in works), [w.error for w in works if w.error][:3]
    jobs = [job for w in works for job in w.jobs]
    run_jobs(llm, jobs[:8], 0, False)  # warm-up
    t: dict[str, list[float]] = {"tool": [], "offline": []}
    tokens = 0
    for _ in range(1):  # one run of each: minutes long, enough to average out the noise
        llm.reset_prefix_cache()
        start = time.perf_counter()
        scores = run_jobs(llm, jobs, 0, False)
        t["offline"].append(time.perf_counter() - start)
        tokens = sum(s.num_tokens for s in scores)
        llm.reset_prefix_cache()
        out = io.StringIO()
        writer = batch.OrderedWriter(out, 1)
        progress = batch.Progress(total=len(lines))
        start = time.perf_counter()
        def emit(record: dict) -> None:
            progress.update(writer.add(record), batch.scored_tokens(record))

        batch.run_engine(llm, iter(enumerate(lines, start=1)), emit, False)
        t["tool"].append(time.perf_counter() - start)
        progress.close()
        assert writer.failed == 0 and out.getvalue().count("\n") == len(lines)
    best = {k: min(v) for k, v in t.items()}
    return {"lines": len(lines), "tokens": tokens, **best,
            "tool_tok_s": tokens / best["tool"], "offline_tok_s": tokens / best["offline"]}  # fmt: skip


def table_rows(r: dict, size: Size) -> list[tuple[str, str, float, str, str]]:
    if "batch" not in r:
        return []
    b = r["batch"]
    return [
        ("9. batch CLI: tokens/s vs the offline API in one call", f"{RESERVED} reserved, block 32",
         b["tool_tok_s"] / b["offline_tok_s"], "≥ 0.95×",
         f"{b['tool_tok_s']:,.0f} vs {b['offline_tok_s']:,.0f} tokens/s ({b['lines']} mixed lines, "
         f"{b['tokens']:,} scored tokens)")
    ]  # fmt: skip

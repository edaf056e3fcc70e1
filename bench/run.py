"""`make bench`: the speed and memory of scoring, as ratios against baselines in the same run.

Builds a ~100M-parameter Llama-shaped model (8 layers, hidden 768, a 32k BPE vocabulary trained
on the Python standard library's source, bf16) in `.cache/bench-model`, then measures:

1. server: the `loglikelihood` field against vLLM's native `prompt_logprobs=0`, same server;
2. server: the `loglikelihood` field against plain prefill (`max_tokens=1`, no logprobs);
3. offline: `vllm_loglik.prompt_loglikelihood` against transformers forward + log_softmax +
   gather (batch 8), on the same tokens;
4. multiple choice: one request per question (4 continuations) against each (context,
   continuation) as its own native prompt-logprobs request, as lm-eval's vLLM backend does;
5. memory: peak RSS of the server's process tree while scoring one 8,000-token prompt with
   `top_logprobs=5`, against plain prefill of the same prompt;
6. front-end: the API-server process's own CPU time per scored position (psutil; the engine
   core is a process of its own), the plugin against native `prompt_logprobs`, at k = 0 (the
   full per-token response) and at k = 5. On a GPU this cost, not the forward pass, decides
   the throughput;
7. offline multiple choice: `vllm_loglik.loglikelihood` on an `LLM` with prefix caching on and
   `block_size=32`, against one native `prompt_logprobs` prompt per pair in one `generate` call;
8. lm-eval: the wall time of lm-eval's CLI on a 4-choice task with long contexts, the
   `vllm-loglik` model against lm-eval's `local-completions`, on the same server;
9. batch: scored tokens per second of `vllm-loglik score`'s engine loop on 2,000 mixed lines,
   against the offline API called once on the same jobs;
10. lm-eval in process: `simple_evaluate` on a 4-choice task with 1,000-token contexts,
    `--model vllm-loglik-offline` against lm-eval's own `--model vllm`, the same model and
    `--model_args`, each in a process of its own, timed after the model is built and warmed
    up on other questions;
11. the same on a rolling (perplexity) task of long documents;
12. token-id responses: one 1,000-token prompt and 16 responses of 200 tokens, as token ids,
    with `vllm_loglik.loglikelihood_tokens` (the prompt computed once) against native
    `prompt_logprobs` on each prompt + response;
13. lm-eval in process on a 5-shot multiple-choice task shaped like MMLU (the same 5 examples
    before every question, letters as choices), against `--model vllm`;
14. lm-eval's own `local-completions` (echo scoring, one request per pair) on row 10's task,
    against the plugin's server (echo acceleration) and against plain vLLM;
15. the same on row 13's 5-shot MMLU-shaped task;
16. words: corrected word scores (`loglikelihood.words`) of long documents in rolling windows,
    against the token scores of the same documents, on the same server;
17. report: `vllm-loglik report` of a 10,000-line `--details` run, opened in headless
    Chromium: the time until the page is usable against the time the same browser takes to
    load the scores file as plain text, with the report's size;
18. TRL's teacher request (`/get_sequence_logprobs/`, json and binary) against plain vLLM's
    `/v1/completions` with `prompt_logprobs` (what TRL's client sends), a long shared prompt;
19. the same with long completions, and the size of the answers;
20. TRL 1.16's own body (`prompt_logprobs`) on the plugin's server (echo acceleration) against
    plain vLLM, on both shapes.

Each family of rows is a module of its own, which a newcomer can read whole: `server_rows.py`
(1, 2, 4, 5, 6, 16), `offline_rows.py` (3, 7), `batch_rows.py` (9), `lm_eval_rows.py` (8, 10, 11,
13), `token_responses.py` (12), `echo_rows.py` (14, 15), `report_rows.py` (17), `teacher_rows.py`
(18-20); what they share (the sizes, the model, servers, timing, a row in
a process of its own) is in `common.py`. This script runs them and prints the table.

Rows 1-3 and 6 run twice: with vLLM's CPU default of one core reserved for the front-end
(`VLLM_CPU_NUM_OF_RESERVED_CPU=1`), and with none (`=0`). Rows 4 and 5 use the setting that
`RESERVED` names, and so do rows 7 and 8. Row 4 runs twice: with the CPU default KV block of 128
tokens, and with 32. Prefix caching is off except in row 4, where the cache is the thing measured.
Every row runs in the dtype that the CPU runs natively: bfloat16 where the CPU has
`avx512_bf16` or `amx_bf16`, else float32 (bf16 is emulated there, hundreds of times slower,
and a ratio would measure the emulation); the JSON records the dtype and the CPU's model and
flags. `--only KEY[,KEY]` re-runs some rows (keys of the JSON: `offline`, `server`,
`multiple_choice`, `offline_multiple_choice`, `batch`, `lm_eval`, `lm_eval_offline`,
`token_responses`, `echo`, `memory_large_vocab`, `words`, `report`, `teacher`) and keeps
the others' figures from the existing JSON.
Prints a markdown table and writes the figures as JSON (`bench/latest.json`, or `--json PATH`).
`--vllm VERSION` runs the rows on another vLLM's Python (`tests/vllm_next/build_tree.py`, first
on `PYTHONPATH`: for 0.34.0, Model Runner V2's standalone CPU runner) and writes
`bench/latest-vllm-VERSION.json` and that version's table of the performance page.
`--smoke` runs the same code on the tiny test model with a few prompts, to keep this script
working (`make soak` runs it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batch_rows  # noqa: E402
import echo_rows  # noqa: E402
import lm_eval_rows  # noqa: E402
import offline_rows  # noqa: E402
import report_rows  # noqa: E402
import server_rows  # noqa: E402
import teacher_rows  # noqa: E402
import token_responses  # noqa: E402
from common import (  # noqa: E402
    FULL,
    RESERVED,
    ROOT,
    SMOKE,
    Size,
    build,
    cpu_info,
    native_dtype,
    offline_child,
    serve,
)
from docs_tables import write_docs_table  # noqa: E402

#: The modules whose rows the table prints, each with `table_rows(results, size)`.
FAMILIES = (server_rows, offline_rows, batch_rows, lm_eval_rows, token_responses, echo_rows,
            report_rows, teacher_rows)  # fmt: skip


def table(r: dict, size: Size) -> str:
    """The markdown table of every row whose figures `r` holds."""
    rows = [row for family in FAMILIES for row in family.table_rows(r, size)]
    rows.sort(key=lambda row: int(row[0].split(".")[0]))  # by row number; settings in order
    lines = [
        "| row | CPU setting | ratio | goal | measured |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c:.2f}× | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few prompts")
    parser.add_argument("--json", type=Path, help="where to write the figures")
    parser.add_argument("--only", help="re-run these rows (JSON keys, comma-separated)")
    parser.add_argument("--vllm", help="run on this vLLM version's Python (build_tree.py)")
    parser.add_argument(
        "--offline-child", choices=["rows", "mc", "batch", "responses", "lm_ours", "lm_vllm"],
        help=argparse.SUPPRESS,
    )  # fmt: skip
    args = parser.parse_args()
    if args.vllm and os.environ.get("VLLM_LOGLIK_BENCH_VLLM") != args.vllm:
        _run_on(args.vllm)
    size = SMOKE if args.smoke else FULL
    cpu = cpu_info()
    # The smoke run checks numbers to 1e-4, which needs float32; its timings mean nothing.
    dtype = "float32" if args.smoke else native_dtype(cpu)
    model = build(size)

    if args.offline_child:  # runs in its own process, so its engine is gone before the server's
        kind = args.offline_child
        if kind.startswith("lm_"):
            figures = lm_eval_rows.lm_eval_in_process(model, size, dtype, kind.removeprefix("lm_"))
        elif kind == "responses":
            figures = token_responses.token_responses(
                model, size.context_len, size.responses, size.response_len, dtype, size.repeats
            )
        else:
            rows = {"rows": offline_rows.offline_rows, "mc": offline_rows.offline_multiple_choice,
                    "batch": batch_rows.offline_batch}  # fmt: skip
            figures = rows[kind](model, size, dtype)
        args.json.write_text(json.dumps(figures))
        sys.stdout.flush()
        os._exit(0)  # skip the engine's teardown, which can abort the process at exit

    name = "latest.json" if size.name == "full" else "smoke.json"
    if args.vllm:
        name = f"latest-vllm-{args.vllm}.json" if size.name == "full" else f"smoke-vllm-{args.vllm}.json"
    out = args.json or (ROOT / "bench" / name)
    keys = ["offline", "server", "multiple_choice", "offline_multiple_choice", "batch",
            "lm_eval", "lm_eval_offline", "token_responses", "echo", "memory_large_vocab",
            "words", "report", "teacher"]  # fmt: skip
    # The smoke run leaves out row 5 on a 131k vocabulary: a server of its own, around a
    # 131k-vocabulary model, whose measuring code is row 5's.
    default = [k for k in keys if not (args.smoke and k == "memory_large_vocab")]
    only = default if args.only is None else args.only.split(",")
    if set(only) - set(keys):
        sys.exit(f"--only takes {', '.join(keys)}")
    results: dict = json.loads(out.read_text()) if args.only and out.exists() else {}
    results["size"] = size.name
    import vllm

    results["vllm"] = vllm.__version__
    # Where and in which dtype each row was measured (rows measured before this was recorded
    # keep no entry).
    where = results.setdefault("measured_on", {})
    for key in only:
        where[key] = {"cpu": cpu, "dtype": dtype}
    if "offline" in only:
        results["offline"] = {
            str(reserved): offline_child(args.smoke, size, reserved) for reserved in size.settings
        }
    if "server" in only:
        results["server"] = {}
        for reserved in size.settings:
            max_len = max(size.memory_len, size.prompt_len) + 16
            with serve(model, dtype, max_len, False, 8301, reserved) as server:
                results["server"][str(reserved)] = server_rows.server_rows(server, model, size)
                if reserved == RESERVED:
                    results["memory"] = server_rows.memory_row(server, model, size)
    if "multiple_choice" in only:
        results["multiple_choice"] = server_rows.multiple_choice(model, dtype, size)
    if "offline_multiple_choice" in only:
        results["offline_multiple_choice"] = offline_child(args.smoke, size, RESERVED, "mc")
    if "batch" in only:
        results["batch"] = offline_child(args.smoke, size, RESERVED, "batch")
    if "lm_eval" in only:
        results["lm_eval"] = lm_eval_rows.lm_eval_row(model, dtype, size)
    if "lm_eval_offline" in only:
        results["lm_eval_offline"] = lm_eval_rows.lm_eval_offline_rows(model, size, dtype, args.smoke)
    if "token_responses" in only:
        results["token_responses"] = offline_child(args.smoke, size, RESERVED, "responses")
    if "echo" in only:
        results["echo"] = echo_rows.echo_rows(model, size, dtype)
    if "memory_large_vocab" in only:
        results["memory_large_vocab"] = server_rows.memory_large_vocab(size, dtype)
    if "words" in only:
        results["words"] = server_rows.words_row(model, dtype, size)
    if "teacher" in only:
        results["teacher"] = teacher_rows.teacher_rows(model, dtype, size)
    if "report" in only:
        results["report"] = report_rows.report_row(args.smoke)
        where["report"]["dtype"] = "float32 (the scores run; the report's timing does not depend on it)"

    text = table(results, size)
    results["table"] = text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if out == ROOT / "bench" / "latest.json":
        write_docs_table(text)
    elif args.vllm and out == ROOT / "bench" / f"latest-vllm-{args.vllm}.json":
        write_docs_table(text, args.vllm)
    print(text)
    print(f"\nfigures written to {out}")
    # In float32 (the smoke run) the two paths must agree to 1e-4, as the tests require; in
    # bf16 batch composition changes rounding, so the figure is reported, not checked.
    if dtype == "float32" and "multiple_choice" in only:
        if results["multiple_choice"]["max_abs_diff"] > 1e-4:
            sys.exit("FAIL: the multiple-choice path disagrees with per-pair scoring")
    if dtype == "float32" and "token_responses" in only:
        if results["token_responses"]["max_abs_diff"] > 1e-4:
            sys.exit("FAIL: token-id responses disagree with native prompt_logprobs")
    if dtype == "float32" and "lm_eval_offline" in only:
        lo = results["lm_eval_offline"]
        if max(lo[f"{task}_max_abs_diff"] for task in lm_eval_rows.OFFLINE_TASKS) > 1e-4:
            sys.exit("FAIL: vllm-loglik-offline disagrees with lm-eval's vllm model")
    if dtype == "float32" and "teacher" in only:
        if max(results["teacher"][shape]["max_abs_diff"] for shape in teacher_rows.SHAPES) > 1e-4:
            sys.exit("FAIL: teacher logprobs disagree with plain vLLM's prompt_logprobs")
    if dtype == "float32" and "echo" in only:
        if max(results["echo"][f"{task}_max_abs_diff"] for task in echo_rows.TASKS) > 1e-4:
            sys.exit("FAIL: local-completions gets other numbers from the plugin's server")


def _run_on(version: str) -> None:
    """Run this script again with `version`'s vLLM tree first on `PYTHONPATH` (its servers and
    offline children inherit it)."""
    sys.path.insert(0, str(ROOT / "tests" / "vllm_next"))
    from build_tree import build

    tree = build(version, ROOT / ".cache" / f"vllm-{version}")
    env = dict(os.environ, VLLM_LOGLIK_BENCH_VLLM=version)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree.resolve()), env.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    main()

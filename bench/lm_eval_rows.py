"""Rows 8, 10, 11 and 13: lm-evaluation-harness's own CLI and `simple_evaluate`.

8. the wall time of lm-eval's CLI on a 4-choice task with long contexts, the `vllm-loglik`
   model against lm-eval's `local-completions`, on the same server;
10. lm-eval in process: `simple_evaluate` on a 4-choice task with 1,000-token contexts,
    `--model vllm-loglik-offline` against lm-eval's own `--model vllm`, the same model and
    `--model_args`, each in a process of its own, timed after the model is built and warmed
    up on other questions;
11. the same on a rolling (perplexity) task of long documents;
13. the same on a 5-shot multiple-choice task shaped like MMLU: the same five examples before
    every question (`fewshot_config: sampler: first_n`), letters as the choices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESERVED, ROOT, Size, offline_child, questions, serve, token_prompts

LM_EVAL_TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""

def lm_eval_row(model: str, dtype: str, size: Size) -> dict:
    """Row 8: lm-eval's wall time on a 4-choice task with long contexts, `vllm-loglik`
    against lm-eval's own `local-completions` (echo + logprobs, one request per pair), on the
    same server (prefix caching on, `--block-size 32`), each with `num_concurrent` = clients.
    Each is one run of the CLI, start-up included; ours runs first, after a warm-up on other
    contexts (local-completions' requests store their prompts in the prefix cache)."""
    import httpx
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    folder = ROOT / ".cache" / f"bench-lm-eval-{size.name}"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "bench_mc.jsonl"
    with open(data, "w") as f:
        for q, (ctx, conts) in enumerate(questions(model, size, size.lm_eval_questions, seed=4)):
            doc = {"question": tok.decode(ctx[1:]), "choices": conts, "answer": q % 4}
            f.write(json.dumps(doc) + "\n")
    (folder / "bench_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    cli = str(Path(sys.executable).parent / "vllm-loglik")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    with serve(model, dtype, size.context_len + 64, True, 8303, RESERVED, 32) as server:
        for ctx, conts in questions(model, size, size.clients, seed=3):
            body = {"model": "bench", "prompt": ctx, "max_tokens": 0,
                    "loglikelihood": {"continuations": conts}}  # fmt: skip
            httpx.post(server.url + "/v1/completions", json=body, timeout=600).raise_for_status()
        url = server.url + "/v1/completions"
        out: dict = {}
        for name, model_args in (
            ("ours", f"model=bench,base_url={url},num_concurrent={size.clients}"),
            ("local_completions",
             f"model=bench,base_url={url},num_concurrent={size.clients},"
             f"tokenizer_backend=huggingface,tokenizer={model},tokenized_requests=True"),
        ):  # fmt: skip
            lm = "vllm-loglik" if name == "ours" else "local-completions"
            shutil.rmtree(folder / name, ignore_errors=True)  # results of an earlier run
            cmd = [cli, "eval", "--model", lm, "--model_args", model_args, "--tasks", "bench_mc",
                   "--include_path", str(folder), "--output_path", str(folder / name)]  # fmt: skip
            start = time.perf_counter()
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            out[name] = time.perf_counter() - start
            if run.returncode != 0:
                sys.exit(f"lm-eval ({lm}) failed:\n{run.stderr[-3000:]}")
            (results,) = (folder / name).rglob("results_*.json")
            out[f"{name}_acc"] = json.loads(results.read_text())["results"]["bench_mc"]["acc,none"]
    return out

LM_EVAL_ROLLING_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""

#: lm-eval's name of each side of rows 10 and 11.
IN_PROCESS_MODELS = {"ours": "vllm-loglik-offline", "vllm": "vllm"}

LM_EVAL_MMLU_TASK = """task: NAME
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
    dev: DEV
test_split: test
fewshot_split: dev
num_fewshot: 5
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""

#: The timed tasks of rows 10, 11 and 13.
OFFLINE_TASKS = ("bench_offline_mc", "bench_offline_rolling", "bench_offline_mmlu")


def mmlu_docs(tok, ids: list[int], count: int, length: int, at: int) -> list[dict]:
    """`count` MMLU-shaped questions of about `length` tokens each (a question and four short
    answers), from the token ids `ids` from position `at` on."""
    docs = []
    for q in range(count):
        start = at + q * (length + 40)
        question = tok.decode(ids[start : start + length]).strip()
        choices = [tok.decode(ids[start + length + 8 * j : start + length + 8 * j + 6]).strip()
                   for j in range(4)]  # fmt: skip
        docs.append({"question": question, "choices": choices, "answer": q % 4})
    return docs


def lm_eval_offline_tasks(model: str, size: Size) -> Path:
    """The tasks of rows 10, 11 and 13 and their warm-ups (other questions, another document,
    other questions after other examples)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    folder = ROOT / ".cache" / f"bench-lm-eval-offline-{size.name}"
    folder.mkdir(parents=True, exist_ok=True)
    text = tok.decode(token_prompts(model, 1, (size.rolling_docs + 1) * size.rolling_doc_len, 6)[0][1:])
    ids = tok.encode(text, add_special_tokens=False)
    docs = [tok.decode(ids[i * size.rolling_doc_len : (i + 1) * size.rolling_doc_len])
            for i in range(size.rolling_docs + 1)]  # fmt: skip
    for name, items, documents in (
        ("bench_offline_mc", questions(model, size, size.lm_offline_questions, seed=7), docs[1:]),
        ("bench_warm_mc", questions(model, size, 2, seed=8), docs[:1]),
    ):
        with open(folder / f"{name}.jsonl", "w") as f:
            for q, (ctx, conts) in enumerate(items):
                doc = {"question": tok.decode(ctx[1:]), "choices": conts, "answer": q % 4}
                f.write(json.dumps(doc) + "\n")
        (folder / f"{name}.yaml").write_text(
            LM_EVAL_TASK.replace("bench_mc", name).format(data=folder / f"{name}.jsonl")
        )
        rolling = name.replace("_mc", "_rolling")
        with open(folder / f"{rolling}.jsonl", "w") as f:
            for document in documents:
                f.write(json.dumps({"text": document}) + "\n")
        (folder / f"{rolling}.yaml").write_text(
            LM_EVAL_ROLLING_TASK.format(name=rolling, data=folder / f"{rolling}.jsonl")
        )
    # Row 13: its questions and examples come from the end of the rolling text's tokens.
    at = len(ids) // 2
    span = size.mmlu_len + 40
    count = size.lm_offline_questions
    for name, questions_at, dev_at, n in (
        ("bench_offline_mmlu", at, at + (count + 2) * span, count),
        ("bench_warm_mmlu", at + (count + 7) * span, at + (count + 9) * span, 2),
    ):  # fmt: skip
        for split, where, k in (("test", questions_at, n), ("dev", dev_at, 5)):
            with open(folder / f"{name}_{split}.jsonl", "w") as f:
                for doc in mmlu_docs(tok, ids, k, size.mmlu_len, where):
                    f.write(json.dumps(doc) + "\n")
        task = LM_EVAL_MMLU_TASK.replace("NAME", name)
        task = task.replace("DATA", str(folder / f"{name}_test.jsonl"))
        (folder / f"{name}.yaml").write_text(task.replace("DEV", str(folder / f"{name}_dev.jsonl")))
    return folder

def lm_eval_in_process(model: str, size: Size, dtype: str, side: str) -> dict:
    """One side of rows 10, 11 and 13, in a child process: build the lm-eval model, warm it up on
    the warm-up tasks, then time `simple_evaluate` on each task."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    if side == "ours":
        import vllm_loglik.harness  # noqa: F401  (registers vllm-loglik-offline)
    folder = ROOT / ".cache" / f"bench-lm-eval-offline-{size.name}"
    args = (f"pretrained={model},dtype={dtype},max_model_len={size.context_len + 64},"
            "enforce_eager=True,block_size=32,seed=0")  # fmt: skip
    lm = get_model(IN_PROCESS_MODELS[side]).create_from_arg_string(args, {"batch_size": "auto"})
    tasks = TaskManager(include_path=str(folder))

    def evaluate(task: str) -> dict:
        return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, log_samples=True)

    evaluate("bench_warm_mc")
    evaluate("bench_warm_rolling")
    evaluate("bench_warm_mmlu")
    out: dict = {}
    for task in OFFLINE_TASKS:
        start = time.perf_counter()
        result = evaluate(task)
        out[task] = {"seconds": time.perf_counter() - start,
                     "metrics": {k: v for k, v in result["results"][task].items()
                                 if isinstance(v, float)},
                     "loglikelihoods": [float(r[0]) if isinstance(r, (list, tuple)) else float(r)
                                        for s in result["samples"][task]
                                        for r in s["filtered_resps"]]}  # fmt: skip
    return out

def lm_eval_offline_rows(model: str, size: Size, dtype: str, smoke: bool) -> dict:
    """Rows 10, 11 and 13: each side in a process of its own (no engine of ours beside lm-eval's),
    lm-eval's first; lm-eval's `vllm` model gets a `vllm` dist-info on the CPU build."""
    from vllm_loglik.testing import lm_eval_vllm_env

    lm_eval_offline_tasks(model, size)
    env = lm_eval_vllm_env(ROOT / ".cache" / "bench-vllm-dist")
    vllm = offline_child(smoke, size, RESERVED, "lm_vllm", env)
    ours = offline_child(smoke, size, RESERVED, "lm_ours")
    out: dict = {"vllm": vllm, "ours": ours}
    for task in OFFLINE_TASKS:
        a, b = ours[task]["loglikelihoods"], vllm[task]["loglikelihoods"]
        out[f"{task}_max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return out


def table_rows(r: dict, size: Size) -> list[tuple[str, str, float, str, str]]:
    rows = []
    if "lm_eval" in r:
        lm = r["lm_eval"]
        rows.append(
            ("8. lm-eval: `vllm-loglik` vs `local-completions`, same server",
             f"{RESERVED} reserved, block 32", lm["local_completions"] / lm["ours"], "≥ 3×",
             f"{lm['local_completions']:.1f} s vs {lm['ours']:.1f} s ({size.lm_eval_questions} "
             f"questions, {size.context_len}-token contexts; acc {lm['local_completions_acc']:.3f} vs "
             f"{lm['ours_acc']:.3f})")
        )  # fmt: skip
    if "lm_eval_offline" in r:
        lo = r["lm_eval_offline"]
        for task, number, kind, goal, what, metric in (
            ("bench_offline_mc", 10, "multiple choice", "≥ 4×", f"{size.lm_offline_questions} "
             f"questions × 4 choices, {size.context_len}-token contexts", "acc"),
            ("bench_offline_rolling", 11, "rolling", "≥ 1.3×", f"{size.rolling_docs} documents of "
             f"{size.rolling_doc_len} tokens, windows of {size.context_len + 62}", "word_perplexity"),
            ("bench_offline_mmlu", 13, "5-shot, MMLU-shaped", "≥ 4×", f"{size.lm_offline_questions} "
             f"questions × letters A-D after the same 5 examples, about {6 * size.mmlu_len} tokens "
             "each", "acc"),
        ):  # fmt: skip
            if task not in lo["ours"]:
                continue  # figures of a run before the row existed
            theirs, ours = lo["vllm"][task], lo["ours"][task]
            rows.append(
                (f"{number}. lm-eval in process, {kind}: `vllm-loglik-offline` vs `--model vllm`",
                 f"{RESERVED} reserved, block 32", theirs["seconds"] / ours["seconds"], goal,
                 f"{theirs['seconds']:.1f} s vs {ours['seconds']:.1f} s ({what}; {metric} "
                 f"{theirs['metrics'][metric + ',none']:.4g} vs {ours['metrics'][metric + ',none']:.4g},"
                 f" largest difference {lo[task + '_max_abs_diff']:.1e})")
            )  # fmt: skip
    return rows

"""Scoring on a cluster with Ray Data: one `vllm.LLM` per actor, the rows of `vllm-loglik score`.

`LoglikelihoodScorer` is a callable class for `ray.data.Dataset.map_batches`::

    import ray
    from vllm_loglik.ray_data import LoglikelihoodScorer

    ds = ray.data.read_json("s3://bucket/requests/")   # request bodies, one per row
    scores = ds.map_batches(
        LoglikelihoodScorer,
        fn_constructor_kwargs={"model": "meta-llama/Llama-3.1-8B", "max_model_len": 8192},
        batch_format="pyarrow",
        concurrency=8,        # actors: one engine each
        num_gpus=1,           # per actor
        batch_size=256,
    )
    scores.write_parquet("s3://bucket/scores/")

A row is a request body, as one line of `vllm-loglik score`'s input: the columns `prompt` or
`messages`, `loglikelihood` (`true` when absent or null), `id`, and the chat options; or, with
`json_column="text"`, the JSON text of the body in one column (what `ray.data.read_text`
gives). A `line` column, if present, is carried through. The output columns are those of the
CLI's records: `id`, `line`, `loglikelihood` (the entries: compact, or with `content` when
`details=True`) and `error` (null, or `{"message", "param"}` for a row that could not be
scored: the batch goes on).

Columns that a row does not use are null in Arrow (a dataset read from files has every column in
every row); nulls are dropped before the body is read, as if the key were absent.

`vllm-loglik score --ray` runs this on a file: `run_ray`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .batch import DEFAULT_BUDGET_TOKENS, Emit, run_engine

#: The output columns, in order.
COLUMNS = ("id", "line", "loglikelihood", "error")
#: Input lines per read task of `run_ray`.
LINES_PER_SHARD = 1000


class LoglikelihoodScorer:
    """Scores batches of request-body rows on one `vllm.LLM`, built when the actor starts.

    `model` and `llm_kwargs` go to `vllm.LLM(model, **llm_kwargs)`; or pass `engine_args`, a
    `vllm.EngineArgs`, as `vllm-loglik score --ray` does. `details` adds per-token `content`;
    `json_column` names a column that holds each body as JSON text (or UTF-8 bytes), for bodies
    of mixed shapes that one Arrow schema cannot hold; `id_as_json` writes each `id` as JSON text,
    for ids of mixed types. The batch is fed to the engine with about `budget_tokens` prompt
    tokens in flight. `lora_modules` lists LoRA adapters (`"name=path"` strings, or
    `{"name", "path"}` dicts; the engine needs `enable_lora=True`): a row whose `model` names
    one is scored under it, as in `vllm-loglik score`. With `openai=True`, each row's JSON text
    is a line of the OpenAI Batch format (`vllm_loglik.openai_batch`), and the output columns
    are `line` and `record`, the output line as JSON text (its shape varies with its body).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        engine_args: Any = None,
        details: bool = False,
        json_column: str | None = None,
        budget_tokens: int = DEFAULT_BUDGET_TOKENS,
        id_as_json: bool = False,
        lora_modules: Any = None,
        openai: bool = False,
        **llm_kwargs: Any,
    ):
        from vllm import LLM

        from .adapters import Adapters

        if engine_args is not None:
            self.llm = LLM.from_engine_args(engine_args)
        elif model is not None:
            self.llm = LLM(model, **llm_kwargs)
        else:
            raise ValueError("LoglikelihoodScorer needs `model` or `engine_args`")
        self.adapters = Adapters.of(self.llm, lora_modules)
        self.details = details
        self.json_column = json_column
        self.budget_tokens = budget_tokens
        self.id_as_json = id_as_json
        self.openai = openai

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch_rows(batch)
        records: dict[int, dict[str, Any]] = {}

        def emit(record: dict[str, Any]) -> None:
            records[record["line"]] = record

        run_engine(
            self.llm, self._bodies(rows), emit, self.details, self.budget_tokens, self.adapters,
            self.openai,
        )  # fmt: skip
        if self.openai:  # output lines of any shape: one JSON text column
            return {"line": [row.get("line") for row in rows],
                    "record": [json.dumps(records[i], ensure_ascii=False)
                               for i in range(len(rows))]}  # fmt: skip
        out: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for i, row in enumerate(rows):
            record = records[i]
            record["line"] = row.get("line")
            if self.id_as_json:
                record["id"] = json.dumps(record["id"], ensure_ascii=False)
            if record.get("error") is not None:  # one struct type for every batch
                record["error"] = {"message": record["error"]["message"],
                                   "param": record["error"].get("param")}  # fmt: skip
            for c in COLUMNS:
                out[c].append(record.get(c))
        return out

    def _bodies(self, rows: list[dict[str, Any]]) -> Iterator[tuple[int, str | dict[str, Any]]]:
        for i, row in enumerate(rows):
            if self.json_column is None:
                body = strip_nulls(row)
                body.pop("line", None)
                yield i, body
                continue
            text = row.get(self.json_column)
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="surrogateescape")
            yield i, text if isinstance(text, str) else ""

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


#: The fields of an entry that only some entries have (`words` when asked for).
ENTRY_OPTIONAL = ("words", "words_left_out")


def batch_rows(batch: Any) -> list[dict[str, Any]]:
    """The rows of a Ray Data batch (`pyarrow`, `pandas` or `numpy` format) as plain Python."""
    if hasattr(batch, "to_pylist"):  # pyarrow.Table
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        return [{k: plain(v) for k, v in row.items()} for row in batch.to_dict("records")]
    columns = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: plain(v[i]) for k, v in columns.items()} for i in range(n)]


def strip_nulls(value: Any) -> Any:
    """`value` without the null members of its objects, at any depth: Arrow gives a struct every
    field of its type, and a null there means that the key was absent."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def plain(value: Any) -> Any:
    """NumPy arrays and scalars (and NaN, pandas' null) as Python lists, numbers and None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# ---------------------------------------------------------------- `vllm-loglik score --ray`


def shards(path: Path, skip: int, lines_per_shard: int = LINES_PER_SHARD) -> list[dict[str, Any]]:
    """Read tasks for the lines of `path` after the first `skip`: byte offset, first line
    number and line count of each (one pass over the file, reading no line into memory)."""
    out: list[dict[str, Any]] = []
    where = str(path.resolve())
    line, offset = 0, 0
    with open(path, "rb") as f:
        for raw in f:
            line += 1
            if line > skip and (line - skip - 1) % lines_per_shard == 0:
                out.append({"path": where, "offset": offset, "line": line, "count": 0})
            if line > skip:
                out[-1]["count"] += 1
            offset += len(raw)
    return out


def read_shard(shard: dict[str, Any]) -> list[dict[str, Any]]:
    """The input lines of one shard, as rows `{"line": N, "body": <UTF-8 bytes>}`."""
    rows = []
    with open(shard["path"], "rb") as f:
        f.seek(shard["offset"])
        for i in range(shard["count"]):
            raw = f.readline()
            rows.append({"line": shard["line"] + i, "body": raw.rstrip(b"\r\n")})
    return rows


def run_ray(
    input_path: Path,
    skip: int,
    emit: Emit,
    engine_args: Any,
    details: bool,
    concurrency: int,
    num_gpus: float,
    batch_size: int,
    budget_tokens: int,
    lora_modules: Any = None,
    openai: bool = False,
) -> None:
    """Score the lines of `input_path` after the first `skip` through Ray Data, with
    `concurrency` actors of one engine each; records reach `emit` in line order. With
    `openai`, the lines are in the OpenAI Batch format (each output line comes back as JSON
    text: its shape varies with its body)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    ds = (
        ray.data.from_items(shards(input_path, skip))
        .flat_map(read_shard)
        .map_batches(
            LoglikelihoodScorer,
            fn_constructor_kwargs={
                "engine_args": engine_args,
                "details": details,
                "json_column": "body",
                "budget_tokens": budget_tokens,
                "id_as_json": True,  # ids of any JSON type, in one Arrow column
                "lora_modules": lora_modules,
                "openai": openai,
            },
            batch_format="pyarrow",
            batch_size=batch_size,
            concurrency=concurrency,
            num_gpus=num_gpus,
        )
    )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            if openai:
                emit({**json.loads(row["record"]), "line": row["line"]})
                continue
            record = {"id": json.loads(row["id"]), "line": row["line"]}
            if row["error"] is not None:
                record["error"] = {k: v for k, v in row["error"].items() if v is not None}
            else:
                # Arrow gives every entry of a batch the same fields: those that only some
                # entries have (word scores) are null in the others, and left out here, as
                # the CLI's own run writes them.
                record["loglikelihood"] = [
                    {k: v for k, v in entry.items() if v is not None or k not in ENTRY_OPTIONAL}
                    for entry in row["loglikelihood"]
                ]
            emit(record)


def init_ray(
    address: str | None, concurrency: int | None, num_gpus: float | None, engine_args: Any
) -> tuple[int, float]:
    """Start or join Ray; returns the actors to run and the GPUs per actor."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SystemExit("--ray needs Ray Data: pip install 'vllm-loglik[ray]'") from None
    ray.init(address=address, runtime_env={"env_vars": ray_env()}, log_to_driver=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus is None:
        per_engine = engine_args.tensor_parallel_size * engine_args.pipeline_parallel_size
        num_gpus = float(per_engine) if gpus else 0.0
    if concurrency is None:
        concurrency = max(1, int(gpus // num_gpus)) if num_gpus else 1
    return concurrency, num_gpus


def ray_env() -> dict[str, str]:
    """The driver's vLLM settings, for the actors (a cluster's workers do not share its env)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_", "OMP_"))}

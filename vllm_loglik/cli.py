"""The `vllm-loglik` command.

`vllm-loglik eval [lm_eval arguments]` registers this package's lm-evaluation-harness models
(`vllm-loglik`, `vllm-loglik-chat`) and runs lm-eval's own command line with the arguments
unchanged, every flag included: lm-eval 0.4 finds no model outside its own package.
"""

from __future__ import annotations

import sys

USAGE = """usage: vllm-loglik COMMAND [ARGS]

commands:
  eval    run lm-evaluation-harness with the vllm-loglik and vllm-loglik-chat models;
          takes lm_eval's arguments, e.g.
          vllm-loglik eval --model vllm-loglik \\
              --model_args base_url=http://127.0.0.1:8000/v1/completions,model=MODEL \\
              --tasks hellaswag
"""


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


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    command, rest = args[0], args[1:]
    if command == "eval":
        run_eval(rest)
    else:
        print(USAGE, end="", file=sys.stderr)
        sys.exit(f"vllm-loglik: unknown command {command!r}")


if __name__ == "__main__":
    main()

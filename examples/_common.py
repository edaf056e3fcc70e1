"""What the examples share: where the server is, and which model it serves.

Each example talks to a running server with the plugin, e.g.
`VLLM_PLUGINS=loglikelihood vllm serve MODEL`, at `--base-url` (default
http://127.0.0.1:8000/v1, or $OPENAI_BASE_URL), with the key in $OPENAI_API_KEY if it has one.
"""

from __future__ import annotations

import argparse
import os


def connect(
    description: str, options: dict[str, str] | None = None
) -> tuple[object, str, argparse.Namespace]:
    """An `openai` client, the served model's name, and the parsed arguments (with the
    example's own `options`: flag -> default)."""
    import openai

    parser = argparse.ArgumentParser(description=description)
    for flag, default in (options or {}).items():
        parser.add_argument(flag, default=default)
    parser.add_argument(
        "--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    )
    parser.add_argument("--model", help="the served model (default: the server's first)")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"))
    model = args.model or client.models.list().data[0].id
    return client, model, args

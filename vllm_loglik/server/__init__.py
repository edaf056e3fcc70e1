"""The `vllm serve` plugin: a `loglikelihood` field on `/v1/completions` and `/v1/chat/completions`.

This package is the only code that touches vLLM's server. One module per concern:

| module | what it holds |
| --- | --- |
| `plugin` | the `vllm.endpoint_plugins` entry point and the route wrapping |
| `protocol` | the request models (vLLM's plus the field), `RequestError`, the error shape |
| `validation` | checks shared by both endpoints (400 naming the field) |
| `limits` | the caps on one request, each an environment variable (400 or 413) |
| `engine` | `ServerScoring`: engine requests, shared contexts through the prefix cache |
| `completions` | the `/v1/completions` handler |
| `chat` | the `/v1/chat/completions` handler |
| `responses` | merging entries into vLLM's responses, score-only responses |
| `echo` | echo acceleration: scoring-only echo completions read shared prefixes' logprobs |
"""

from .plugin import LoglikelihoodPlugin

__all__ = ["LoglikelihoodPlugin"]

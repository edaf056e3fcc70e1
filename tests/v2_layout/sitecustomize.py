"""Test-only hook: make a CPU server return prompt logprobs in Model Runner V2's layout.

vLLM on a GPU runs Model Runner V2, which returns the prompt logprobs of a request that read
`c` tokens from the prefix cache as `[None]` plus rows for positions `c + 1 .. n - 1` only
(`vllm/v1/worker/gpu/sample/prompt_logprob.py`). The CPU build runs V1, which returns a row
for every position and leaves the cached ones unset. This file is put on the `PYTHONPATH` of
one test server only (Python imports `sitecustomize` at start-up), and rewrites each V1
`RequestOutput` into V2's layout in the API server process, where the plugin reads it, by
wrapping `RequestState._new_request_output` in `vllm/v1/engine/output_processor.py` when that
module is imported.

Every rewrite is appended to the file named by `VLLM_LOGLIK_V2_LAYOUT_LOG`, so the test can
show that the V2 layout was really served.

It also injects faults, for prompts whose tokens 1 to 4 are a marker: `BREAK_CACHED` gives the
output of a request that read the cache a length that fits neither layout, and `BREAK_ALL`
does so to every output, so that the plugin's fallback and its fault reporting can be tested.
"""

import importlib.abc
import importlib.util
import os
import sys

BREAK_CACHED = [1000, 1001, 1002, 1003]
BREAK_ALL = [1003, 1002, 1001, 1000]


TARGET = "vllm.v1.engine.output_processor"


def _install(module) -> None:
    log_path = os.environ["VLLM_LOGLIK_V2_LAYOUT_LOG"]
    from vllm.logprobs import FlatLogprobs
    from vllm.outputs import RequestOutput

    RequestState = module.RequestState

    original = RequestState._new_request_output

    def v2_layout(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not isinstance(out, RequestOutput) or out.prompt_logprobs is None:
            return out
        cached = out.num_cached_tokens or 0
        marker = list(out.prompt_token_ids[1:5])
        if marker == BREAK_ALL or (marker == BREAK_CACHED and cached):
            out.prompt_logprobs = [None] * 3
            return out
        if cached:
            v1 = out.prompt_logprobs
            if isinstance(v1, FlatLogprobs):  # `flat_logprobs=True`: keep the container
                v2 = FlatLogprobs()
                v2.append(None)
                v2.extend(v1[cached + 1 :])
                out.prompt_logprobs = v2
            else:
                out.prompt_logprobs = [None] + list(v1[cached + 1 :])
            with open(log_path, "a") as log:
                log.write(f"{out.request_id} {len(v1)} {cached} {len(out.prompt_logprobs)}\n")
        return out

    RequestState._new_request_output = v2_layout


class _WhenImported(importlib.abc.MetaPathFinder):
    """Wraps the output processor when (and only if) a process imports it: every other Python
    process started with this `PYTHONPATH` (the engine's workers, the compilers' probes that
    torch runs in subprocesses) pays nothing, and imports no vLLM because of this file."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _install(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("VLLM_LOGLIK_V2_LAYOUT_LOG"):
    sys.meta_path.insert(0, _WhenImported())

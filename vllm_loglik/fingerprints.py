"""What vllm-loglik relies on in vLLM's code, and whether the installed vLLM still has it.

Seven places of this package reach past vLLM's public extension points, each for a reason of its
own (its module says which):

| reliance | module | what it does when the installed vLLM's code differs |
| --- | --- | --- |
| `target_logprobs` | `vllm_loglik.target_logprobs` | no patch: vLLM's own prompt logprobs, each scoring request counted on `fallbacks_total{reason="prompt_logprobs_path"}` |
| `v2_scoring` | `vllm_loglik.v2_scoring` | on V2: vLLM's own prompt logprobs for every position, no prefix-cache reads, no corrected word scores (as on vLLM 0.32/0.33's V2) |
| `echo` | `vllm_loglik.server.echo` | echo requests left to vLLM, each counted on `fallbacks_total{reason="echo_path"}` |
| `output_layout` | `vllm_loglik.engine_output` | no prefix-cache reads: every span is computed whole, where both runners' layouts are the same, each scoring request counted on `fallbacks_total{reason="cache_reads"}` |
| `lora_kernels` | `vllm_loglik.engine_requests` | base-model and adapter requests take turns on the CPU (the safe choice) |
| `routes` | `vllm_loglik.server.plugin` | the routes are still replaced (they are the field itself), with a warning |
| `engine_death` | `vllm_loglik.server.engine_death` | the API server exits as vLLM's own, with status 0 after its engine died |

Each declares a `Reliance` (`vllm_loglik.reliance`, which says how a reliance is checked
against the installed vLLM's code). This module is the registry above them: it imports each
declaring module, and none of them imports it.

`vllm-loglik fingerprints` prints each reliance's verdict for the installed vLLM;
`vllm-loglik fingerprints record` adds the installed vLLM's fingerprints as a
verified version (run it only once the tests pass on that version: `make test-vllm-next`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .reliance import (  # noqa: F401  (the checks, for the CLI and the tests)
    DATA,
    Reliance,
    Verdict,
    _reported,
    _version_key,
    check,
    checked,
    fingerprint,
    report,
    source_of,
    verified,
    vllm_version,
)


def RELIANCES() -> dict[str, Reliance]:  # noqa: N802  (a constant, made on first use)
    """Every reliance of the package, by name (imported here, so that this module imports no
    vLLM until asked, and a process checks only the reliances of the code it runs)."""
    from . import engine_output, engine_requests, target_logprobs, v2_scoring
    from .server import echo, engine_death, plugin

    found = (
        target_logprobs.RELIES_ON, v2_scoring.RELIES_ON, echo.RELIES_ON, engine_output.RELIES_ON,
        engine_requests.LORA_RELIES_ON, plugin.RELIES_ON, engine_death.RELIES_ON,
    )  # fmt: skip
    return {r.name: r for r in found}


def record(path: Path) -> str:
    """Add the installed vLLM's fingerprints of every reliance to `path`, as a verified version.
    Code that this vLLM does not have (V1's, from 0.34 on; V2's scoring fields, before it) is
    left out: a reliance on it never holds there."""
    version = vllm_version()
    table = json.loads(path.read_text("utf-8")) if path.exists() else {}
    names = sorted({n for r in RELIANCES().values() for n in r.relies_on})
    prints = {n: fingerprint(n) for n in names}
    if all(p is None for p in prints.values()):
        raise SystemExit(f"none of the relied-on code is in vLLM {version}")
    table[version] = {n: p for n, p in prints.items() if p is not None}
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", "utf-8")
    return version


def main(argv: list[str]) -> None:
    """`vllm-loglik fingerprints [record]`."""
    if argv == ["record"]:
        path = Path(__file__).parent / DATA
        print(f"recorded vLLM {record(path)} in {path}")
        return
    if argv:
        raise SystemExit("usage: vllm-loglik fingerprints [record]")
    print(f"vLLM {vllm_version()}; verified: {', '.join(sorted(verified(), key=_version_key))}")
    for reliance in RELIANCES().values():
        print(check(reliance).describe())

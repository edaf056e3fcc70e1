"""Whether the vLLM code that a module of this package relies on is code that it was verified on.

A module that reaches past vLLM's public extension points declares a `Reliance`: the vLLM
functions, methods, classes and modules that it relies on, named `module:qualname` (`module`
alone for a whole module). `check` computes a fingerprint of each one's source in the installed
vLLM (a SHA-256 of its source text, decorators included, as `ast` finds it in the module's file,
so the module is not imported and its line numbers do not matter) and compares them with those
recorded for each vLLM version that the tests passed on (`data/vllm_fingerprints.json`). A
reliance holds when every one of its fingerprints equals those of one verified version: a vLLM
release that leaves them unchanged gets the fast path, whatever its version string; one that
changes any of them falls back, and `check` names what changed. The version string is only
reported.

This module imports nothing of the package: the modules that declare reliances import it, and
the registry of every reliance (`vllm_loglik.fingerprints`) imports them, one floor above.
"""


from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import textwrap
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm.loglik")

#: The verified fingerprints: `{vLLM version: {"module:qualname": sha256 hex}}`.
DATA = "data/vllm_fingerprints.json"


@dataclass(frozen=True)
class Reliance:
    """One place that reaches into vLLM: its name, and the vLLM code it relies on."""

    name: str
    relies_on: tuple[str, ...]
    #: What happens when the code differs (for the log line).
    otherwise: str


@dataclass(frozen=True)
class Verdict:
    """Whether a `Reliance` holds on the installed vLLM. `version` is the verified vLLM
    version whose code it matched (None when none did); `changed` names the relied-on code that
    differs from the newest verified version's (or is missing)."""

    reliance: Reliance
    version: str | None
    changed: tuple[str, ...] = ()

    @property
    def holds(self) -> bool:
        return self.version is not None

    def reason(self) -> str | None:
        """Why the reliance does not hold, or None where it does."""
        if self.holds:
            return None
        return "vLLM's code differs from every version it was verified on: " + ", ".join(self.changed)

    def describe(self) -> str:
        if self.holds:
            return f"{self.reliance.name}: verified (the code is vLLM {self.version}'s)"
        return f"{self.reliance.name}: not verified, so {self.reliance.otherwise} ({self.reason()})"


def _module_file(module: str) -> Path | None:
    """The source file of `module`, found as an import would find it, without running it (its
    parent packages are imported: `find_spec` needs their `__path__`)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple[list[str], ast.Module]:
    text = path.read_text("utf-8")
    return text.splitlines(keepends=True), ast.parse(text)


def source_of(name: str) -> str | None:
    """The source text of `module:qualname` (or of a whole `module`) in the installed vLLM,
    dedented, decorators included; None where it does not exist."""
    module, _, qualname = name.partition(":")
    path = _module_file(module)
    if path is None:
        return None
    lines, tree = _parsed(path)
    if not qualname:
        return "".join(lines)
    node: Any = tree
    for part in qualname.split("."):
        found = None
        for child in getattr(node, "body", ()):
            names = []
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [child.name]
            elif isinstance(child, (ast.Assign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            if part in names:
                found = child  # the last definition wins, as at run time
        if found is None:
            return None
        node = found
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
    return textwrap.dedent("".join(lines[first - 1 : node.end_lineno]))


def fingerprint(name: str) -> str | None:
    source = source_of(name)
    return None if source is None else hashlib.sha256(source.encode()).hexdigest()


def verified() -> dict[str, dict[str, str]]:
    """The recorded fingerprints of each verified vLLM version."""
    text = resources.files("vllm_loglik").joinpath(DATA).read_text("utf-8")
    return json.loads(text)


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.split("."))


def check(reliance: Reliance, table: dict[str, dict[str, str]] | None = None) -> Verdict:
    """Whether `reliance` holds on the installed vLLM (see the module docstring)."""
    table = verified() if table is None else table
    current = {name: fingerprint(name) for name in reliance.relies_on}
    newest_first = sorted(table, key=_version_key, reverse=True)
    for version in newest_first:
        recorded = table[version]
        if all(current[n] is not None and recorded.get(n) == current[n] for n in reliance.relies_on):
            return Verdict(reliance, version)
    newest = table[newest_first[0]] if newest_first else {}
    changed = tuple(
        f"{n} (missing)" if current[n] is None else n
        for n in reliance.relies_on
        if current[n] is None or newest.get(n) != current[n]
    )
    return Verdict(reliance, None, changed)


_verdicts: dict[str, Verdict] = {}


def checked(reliance: Reliance) -> Verdict:
    """The verdict of `reliance`, computed once per process."""
    verdict = _verdicts.get(reliance.name)
    if verdict is None:
        verdict = _verdicts[reliance.name] = check(reliance)
    return verdict


def vllm_version() -> str:
    """The installed vLLM's version, without a local tag (`0.32.0+cpu` is `0.32.0`)."""
    import vllm

    return vllm.__version__.split("+")[0]


_reported: set[str] = set()


def report(where: str, lines: list[str]) -> None:
    """The start-up line: the vLLM version running, and which fast paths are on and why any is
    off; logged once per process and `where` (`server`, `offline`)."""
    if where in _reported:
        return
    _reported.add(where)
    logger.info("vllm-loglik (%s) on vLLM %s: %s", where, vllm_version(), "; ".join(lines))

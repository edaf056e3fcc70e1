"""Test-only hook: a vLLM in which some functions' code differs, as in a release not verified.

Put on the `PYTHONPATH` of one test server (Python imports `sitecustomize` in every process,
the engine's too), with `VLLM_LOGLIK_CHANGED` naming `module:qualname` functions of vLLM. When
such a module is first imported, this serves a copy of its source in which each named function
starts with one more statement (`pass`): the same behaviour, other code. The copy is a real
file, so the package's fingerprints (`vllm_loglik.fingerprints`, which read the module's file
through `importlib.util.find_spec`) see the change as they would see a new vLLM release's.
"""

import ast
import importlib.abc
import importlib.util
import os
import sys
import tempfile

CHANGED = [n for n in os.environ.get("VLLM_LOGLIK_CHANGED", "").split(",") if n]
MODULES: dict[str, list[str]] = {}
for name in CHANGED:
    module, _, qualname = name.partition(":")
    MODULES.setdefault(module, []).append(qualname)
FOLDER = tempfile.mkdtemp(prefix="vllm-loglik-changed-")


def changed_source(path: str, qualnames: list[str]) -> str:
    text = open(path, encoding="utf-8").read()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    inserts = []
    for qualname in qualnames:
        node = tree
        for part in qualname.split("."):
            node = next(
                c for c in node.body
                if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and c.name == part
            )  # fmt: skip
        first = node.body[0]
        inserts.append((first.lineno, " " * first.col_offset + "pass  # changed by a test\n"))
    for lineno, line in sorted(inserts, reverse=True):
        lines.insert(lineno - 1, line)
    return "".join(lines)


class _Changed(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.specs = {}

    def find_spec(self, name, path, target=None):
        if name not in MODULES:
            return None
        if name not in self.specs:
            sys.meta_path.remove(self)
            try:
                real = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            copy = os.path.join(FOLDER, name + ".py")
            if not os.path.exists(copy):
                with open(copy, "w", encoding="utf-8") as f:
                    f.write(changed_source(real.origin, MODULES[name]))
            self.specs[name] = copy
        return importlib.util.spec_from_file_location(name, self.specs[name])


if MODULES:
    sys.meta_path.insert(0, _Changed())

"""The `model` of a batch line: the base model or a LoRA adapter, as `vllm serve` names them.

`vllm-loglik score` (and Ray's `LoglikelihoodScorer`) take the adapters as `vllm serve` takes
them, `--lora-modules name=path` (or vLLM's JSON form), next to vLLM's engine flags
(`--enable-lora`, `--max-lora-rank`, ...). A line whose `model` names an adapter is scored under
it; a line without `model`, or naming the base model (its path or a `--served-model-name`), is
scored with the base model; any other name is that line's error, naming `model`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .requests import RequestError
from .spans import excerpt


def module_paths(modules: Iterable[Any] | None) -> list[tuple[str, str]]:
    """`(name, path)` of each adapter: `"name=path"` strings, `{"name", "path"}` dicts,
    `(name, path)` pairs, or vLLM's `LoRAModulePath` objects (what its `--lora-modules`
    parser gives)."""
    out = []
    for module in modules or []:
        if isinstance(module, str):
            name, sep, path = module.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"a LoRA module is name=path, got {excerpt(module)}")
        elif isinstance(module, dict):
            name, path = module["name"], module["path"]
        elif isinstance(module, (tuple, list)):
            name, path = module
        else:
            name, path = module.name, module.path
        out.append((name, path))
    return out


class Adapters:
    """The names that a line's `model` may take, and the `LoRARequest` of each adapter."""

    def __init__(self, base_names: Sequence[str], modules: Iterable[Any] | None = None):
        self.base_names = {n for n in base_names if n}
        self.requests: dict[str, Any] = {}
        paths = module_paths(modules)
        if paths:
            from vllm.lora.request import LoRARequest

            # Ids from 1, in the order given, as `vllm serve` numbers its --lora-modules.
            for i, (name, path) in enumerate(paths, start=1):
                self.requests[name] = LoRARequest(lora_name=name, lora_int_id=i, lora_path=path)

    @classmethod
    def of(cls, llm: Any, modules: Iterable[Any] | None = None) -> Adapters:
        """The adapters of `llm`'s engine: its model path and served names are the base."""
        config = llm.llm_engine.model_config
        served = config.served_model_name
        names = [config.model, *([served] if isinstance(served, str) else (served or []))]
        return cls(names, modules)

    def resolve(self, model: Any) -> Any:
        """The `LoRARequest` that `model` names, or None for the base model."""
        if model is None or model in self.base_names:
            return None
        if isinstance(model, str) and model in self.requests:
            return self.requests[model]
        served = ", ".join(sorted(self.base_names | set(self.requests)))
        raise RequestError(
            "model",
            f"model {excerpt(model)} is not served here; the base model or an adapter of "
            f"--lora-modules: {served}",
        )

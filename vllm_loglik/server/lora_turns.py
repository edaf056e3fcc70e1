"""Turns for base-model and adapter scoring on an engine whose LoRA kernels mix them up.

On vLLM 0.32's CPU build, a base-model request that shares an engine step with a LoRA
adapter's request is computed under the last adapter slot (see
`vllm_loglik.engine_requests.lora_mixing_unsafe`). The server cannot choose what the engine
batches, but it can choose what it sends: `Turns` lets scoring requests of one kind (base
model, or adapters: different adapters mix correctly) run together, and makes the other kind
wait until they are done, taking turns so that neither waits forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turns:
    """An asyncio gate with two kinds of holders that never hold it at the same time."""

    def __init__(self) -> None:
        self._kind: bool | None = None  # the kind in the engine now (True: an adapter)
        self._holders = 0
        self._waiting = {False: 0, True: 0}
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def turn(self, adapter: bool) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting[adapter] += 1
            try:
                # Join the running kind only while the other kind is not waiting for its turn.
                await self._changed.wait_for(
                    lambda: self._kind is None
                    or (self._kind == adapter and not self._waiting[not adapter])
                )
            finally:
                self._waiting[adapter] -= 1
            self._kind = adapter
            self._holders += 1
        try:
            yield
        finally:
            async with self._changed:
                self._holders -= 1
                if self._holders == 0:
                    self._kind = None
                    self._changed.notify_all()

"""GPUs held in a `with` / `async with` block while the graph monitors them in the background."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any, Literal, Protocol

from fleet.models import Allocation, Release, ReleaseReason
from graph.outcome import RequestOutcome


class Owner(Protocol):
    """What a handle needs of the Orchestrator that made it (which imports this module)."""

    def release(
        self, allocation_id: str, reason: ReleaseReason = ReleaseReason.EXPLICIT
    ) -> Release: ...

    def outcome(self, thread_id: str) -> RequestOutcome: ...


class AllocationHandle:
    """GPUs held by a running thread. Leaving the `with` block releases them, exactly once."""

    def __init__(
        self,
        orchestrator: Owner,
        thread_id: str,
        allocation: Allocation,
        runner: threading.Thread,
        box: dict[str, Any],
    ) -> None:
        self.orchestrator = orchestrator
        self.thread_id = thread_id
        self.allocation = allocation
        self._runner = runner
        self._box = box

    @property
    def id(self) -> str:
        return self.allocation.id

    @property
    def gpu_ids(self) -> list[str]:
        return self.allocation.gpu_ids

    @property
    def cuda_visible_devices(self) -> str:
        return self.allocation.cuda_visible_devices

    def release(self, reason: ReleaseReason = ReleaseReason.EXPLICIT) -> Release:
        release = self.orchestrator.release(self.id, reason)
        self._runner.join()
        return release

    def wait(self) -> RequestOutcome:
        """Block until the graph has released the allocation (lease, idle, budget...)."""
        self._runner.join()
        if "error" in self._box:
            raise self._box["error"]
        outcome: RequestOutcome = self.orchestrator.outcome(self.thread_id)
        return outcome

    def __enter__(self) -> AllocationHandle:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        self.release(ReleaseReason.CONTEXT_EXIT)
        return False

    async def __aenter__(self) -> AllocationHandle:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        await asyncio.to_thread(self.release, ReleaseReason.CONTEXT_EXIT)
        return False

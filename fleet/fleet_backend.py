"""The one interface every inventory backend (simulated, NVML, replay, Ray) implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from fleet.models import GPUInfo, GPUSample


class FleetBackend(Protocol):
    name: str
    # True where readings come from GPUs (NVML, or a recording of it): the inventory then
    # defines the fleet's nodes, and the fleet file only contributes its catalog and policy.
    hardware: bool

    def inventory(self) -> list[GPUInfo]:
        """Every GPU the fleet has, allocated or not."""
        ...

    def sample(self, gpu_ids: list[str], now: float, holders: Mapping[str, str]) -> list[GPUSample]:
        """One reading per GPU. `holders` maps allocated GPUs to their project."""
        ...

    def throttle(self, gpu_id: str) -> str:
        """Act on an overheating GPU; what was done, in words, for the event."""
        ...

    def unhealthy(self) -> dict[str, str]:
        """GPUs found unusable since the last call (XID errors, lost), with the reason."""
        ...

    def steady_until(self, gpu_ids: list[str], at: float) -> float:
        """Until when the readings taken at `at` stay the same; `at` itself when the backend
        cannot promise it (real GPUs), and then the monitor runs every tick."""
        ...

    def reset(self, gpu_ids: list[str]) -> None:
        """Undo per-allocation actions (throttling) once the GPUs are released."""
        ...


@runtime_checkable
class Reserving(Protocol):
    """A backend that must be told about placements (a Ray cluster: placement groups). All
    three are idempotent, so a node re-run after a crash reserves or frees only once."""

    def reserve(self, allocation_id: str, gpu_ids: list[str]) -> str | None:
        """Reserve the GPUs the ledger placed; None, or why the backend could not."""
        ...

    def free(self, allocation_id: str) -> None: ...

    def reservations(self) -> Mapping[str, Any]:
        """The allocations the backend holds reservations for, by id."""
        ...

"""The one interface every inventory backend (simulated, NVML, replay, Ray, Slurm) implements,
and what the backends that hold GPUs elsewhere add: reservations (Ray) or a scheduler's jobs
(Slurm)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fleet.models import GPUInfo, GPUSample, Purpose, ReleaseReason


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


@dataclass(frozen=True)
class Hold:
    """What a scheduled backend is asked to hold: the GPUs the ledger placed, until `deadline`."""

    allocation_id: str
    project: str
    purpose: Purpose  # the pool it was routed to (Slurm: the pool's partition)
    gpu_ids: list[str]
    deadline: float
    # the request's checkpoint notice (GPURequest.notice_seconds), sent by the scheduler
    notice_seconds: float | None = None
    notice_signal: str = "USR1"
    # when the job must run by (the request's max wait), else the scheduler's own timeout
    start_by: float | None = None


@dataclass(frozen=True)
class SchedulerJob:
    """The scheduler's job that holds an allocation's GPUs, as the ledger records it."""

    job_id: str
    node: str
    gpus: str  # the GPU indices the scheduler chose on the node, as it writes them ("4-5")
    started_at: float


@dataclass(frozen=True)
class Ended:
    """A job the scheduler ended by itself (its time limit, an administrator, a node)."""

    reason: ReleaseReason
    at: float | None  # when it ended; None: unknown (the job is gone from the scheduler)
    why: str  # in words, for the event and the audit log


@runtime_checkable
class Scheduled(Protocol):
    """A backend whose own scheduler holds the GPUs (Slurm): an allocation is a job there,
    which also enforces the lease as its time limit and may end it by itself. gpu-agent ends
    such a job only after the ledger has released the allocation, so a job found ended while
    the ledger still holds it was ended by the scheduler or its administrator."""

    def submit(self, hold: Hold) -> SchedulerJob | str:
        """The running job that holds these GPUs (found by the allocation's name, else
        submitted), or why there is none; idempotent."""
        ...

    def cancel(self, allocation_id: str) -> str | None:
        """End the allocation's jobs; None, or why the scheduler could not be told."""
        ...

    def follow(self, job: SchedulerJob, deadline: float) -> Ended | None:
        """None while the job runs (its time limit then covers `deadline`, the ledger's, and
        no more); else how it ended."""
        ...

    def found(self, allocation_id: str) -> SchedulerJob | None:
        """The allocation's running job, by its name (after a crash before it was recorded)."""
        ...

    def live(self) -> dict[str, list[str]]:
        """Every live job gpu-agent submitted: allocation id -> job ids."""
        ...

    def unavailable(self, held: Mapping[str, str]) -> dict[str, str]:
        """GPUs the scheduler keeps from placement now, with why (a drained or down node, a
        job gpu-agent did not submit); `held`: the GPUs the ledger holds -> allocation id."""
        ...

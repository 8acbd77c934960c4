"""Borrowing between pools, as Kueue's cohorts do: a pool's free GPUs run another pool's queued
work, and go back to their pool, by preemption with notice, when its own work queues for them.

Only work that loses nothing when reclaimed may borrow: a request with a checkpoint notice
(`notice_seconds`: `gpu-agent run --notice`, whose `--requeue` resumes it) that names no type,
where the fleet file opts in (`[preemption] borrow = true`). It borrows another pool's type
that can start it now (free GPUs beyond what that type's queue needs, with the memory it asks
for), the one that finishes its work soonest, where that is sooner than the type routing chose
in its own pool would finish, that type's wait included, and either that type cannot start it
now or the loan is no dearer a unit of work too (fleet.routing.route: inference borrows an
idle research card that does its work five times as fast for a fifth of the price), or, where
the fleet pays for speed (`[preemption] borrow_dearer`), whatever its price. Under a
levelling policy (fleet.maxmin) both, and work running on a slower type moves up to a loan
of the second kind when its GPUs come free (fleet.maxmin.moves_up). A loan is an allocation
on a type outside its purpose's pool that it did not name (`on_loan`). When a request of
the lending pool queues for that type, the youngest loans on it are asked to yield
(fleet.ledger.preempting, action `reclaim`: after their notice, with no minimum run and no
daily limit, the terms they borrowed on) until enough GPUs come back; the pool's own request
is then first in its line, so quotas stay guarantees.
"""

from __future__ import annotations

from collections.abc import Mapping

from fleet.config import FleetConfig
from fleet.models import GPURequest, Purpose


def may_borrow(request: GPURequest, config: FleetConfig) -> bool:
    """Whether `request` may run on another pool's GPUs: the fleet lends, it names no type,
    and a reclaim would lose none of its work (it has a checkpoint notice)."""
    return (
        config.preemption.borrow and request.gpu_type is None and request.notice_seconds is not None
    )


def lenders(request: GPURequest, config: FleetConfig, starts_in: Mapping[str, float]) -> list[str]:
    """The other pools' types that could start `request` now (`starts_in`: per type, hours
    until it could start, fleet.ledger's starts_in_hours), where it may borrow."""
    own = set(config.pool(request.purpose))
    return [t for t in config.catalog if t not in own and starts_in.get(t, 1.0) <= 0]


def lender_of(gpu_type: str, config: FleetConfig) -> Purpose | None:
    """The pool a type lends from: the first whose types include it."""
    return next((p for p, types in config.pools.items() if gpu_type in types), None)


def on_loan(purpose: Purpose, gpu_type: str, named: str | None, config: FleetConfig) -> bool:
    """Whether an allocation borrows its GPUs: its type is outside its purpose's pool and its
    request did not name it."""
    return named is None and gpu_type not in config.pool(purpose)

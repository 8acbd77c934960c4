"""Max-min fairness over effective throughput ([scheduler] policy = "max-min", or
"least-attained"), losing no work.

A job's claim is the effective service its work has received: the hours its allocations held
GPUs, each times its speed on the type (fleet.speeds' table: its workload's [speeds] row, else
the type's relative throughput; work done on a faster type counts for more),
summed over the allocations that resume one another (`GPURequest.resumes`). In each type's
line the least served request goes first (priority levels still first; Slurm's multifactor
score among equals). Where the line cannot start, running allocations that have received at
least `min_run_minutes` of effective service more than a waiting request are asked to yield,
the most served first: after their checkpoint notice and their minimum run (fleet.preemption),
so no work is lost, and requeued by `gpu-agent run --requeue` with their service carried.
Over time this levels every job's received throughput up from the least served, as Gavel's
max-min policy does in rounds; discretised as least-attained-service (Tiresias) with the
minimum run as its quantum, so nobody thrashes. Work on a slower type moves up to a faster
one nobody waits for, and gives it back when new work comes for it (fleet.ledger.levelling).
Only allocations with a checkpoint notice yield; the daily limit per project holds as for a
preemption by hand. "least-attained" counts service per GPU rather than per job (Tiresias's
two-dimensional least attained service: GPU-time), which serves small jobs sooner than large
ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleet.config import FleetConfig
from fleet.models import Priority, Purpose
from fleet.placement import Ticket
from fleet.scheduler import PRIORITY_FACTOR
from fleet.speeds import table_speed, unit_price

LEVELLING = ("max-min", "least-attained")  # the [scheduler] policies this module serves


def levels(config: FleetConfig) -> bool:
    """Whether the fleet's lines are served by service received (this module)."""
    return config.scheduler.policy in LEVELLING


def service(
    seconds: float, gpu_type: str, count: int, config: FleetConfig, workload: str | None = None
) -> float:
    """Service received by holding `count` GPUs of `gpu_type` for `seconds`, in reference
    hours: at the workload's speed there by the fleet file's [speeds] (fleet.speeds), else the
    type's; per job under "max-min" (each job, whatever its size, the same share of time, as
    Gavel's scale factors give), per GPU under "least-attained" (Tiresias's GPU-time)."""
    per_gpu = max(0.0, seconds) / 3600.0 * table_speed(config, workload, gpu_type)
    return per_gpu * (count if config.scheduler.policy == "least-attained" else 1)


@dataclass(frozen=True)
class Runner:
    """A running allocation that could be asked to yield."""

    allocation_id: str
    project: str
    count: int
    priority: Priority
    attained: float  # effective hours received, this allocation's so far included
    notice_s: float
    deadline: float


def to_yield(
    line: list[Ticket], supply: int, runners: list[Runner], quantum_hours: float
) -> list[tuple[Runner, Ticket]]:
    """Which runners yield, and for whom: in the line's order (fleet.placement.line_order),
    each waiting request takes from the `supply` of GPUs free or already coming back, and
    where that is short, from the most served runners of no higher priority that have
    received `quantum_hours` more than it. A request that cannot be covered so stops the
    walk, asking nobody for it."""
    left = sorted(runners, key=lambda r: -r.attained)
    out: list[tuple[Runner, Ticket]] = []
    for want in line:
        taken: list[Runner] = []
        for r in left:
            if supply + sum(x.count for x in taken) >= want.count:
                break
            if (
                r.attained >= want.attained + quantum_hours
                and PRIORITY_FACTOR[r.priority] <= PRIORITY_FACTOR[want.priority]
            ):
                taken.append(r)
        supply += sum(x.count for x in taken)
        if supply < want.count:
            break
        supply -= want.count
        out += [(r, want) for r in taken]
        left = [r for r in left if r not in taken]
    return out


def sources(gpu_type: str, config: FleetConfig) -> list[str]:
    """The types work may move up to `gpu_type` from: the other types of the pools that hold
    it, and where the fleet lends (fleet.borrowing), every other type."""
    if config.preemption.borrow:
        return sorted(set(config.catalog) - {gpu_type})
    return sorted(
        {t for types in config.pools.values() if gpu_type in types for t in types} - {gpu_type}
    )


def moves_up(
    asked: Mapping[str, Any], purpose: Purpose, here: str, there: str, config: FleetConfig
) -> bool:
    """Whether the work of a request (`asked`, as stored) for `purpose` running on `here`
    goes on, sooner, on `there`: a type with the memory it asks for that does its workload's
    work faster for no more a unit, of its own pool; or, where the fleet lends
    (fleet.borrowing), of another pool, no dearer a unit than its own pool's cheapest type
    either (`[preemption] borrow_dearer`: whatever its price), so that routing borrows it when
    the work asks again (fleet.routing)."""
    own = config.pool(purpose)
    if (asked.get("min_memory_gb") or 0) > config.catalog[there].memory_gb:
        return False
    if there not in own and not config.preemption.borrow:
        return False
    workload = asked.get("workload")
    if table_speed(config, workload, there) <= table_speed(config, workload, here):
        return False
    if there not in own and config.preemption.borrow_dearer:
        return True
    allowed = (
        unit_price(config, workload, here)
        if there in own
        else min(unit_price(config, workload, t) for t in own)
    )
    return unit_price(config, workload, there) <= allowed

"""Max-min fairness over effective throughput ([scheduler] policy = "max-min"), losing no work.

A job's claim is the effective service its work has received: the hours its allocations held
GPUs, each times its type's relative throughput (work done on a faster type counts for more),
summed over the allocations that resume one another (`GPURequest.resumes`). In each type's
line the least served request goes first (priority levels still first; Slurm's multifactor
score among equals). Where the line cannot start, running allocations that have received at
least `min_run_minutes` of effective service more than a waiting request are asked to yield,
the most served first: after their checkpoint notice and their minimum run (fleet.preemption),
so no work is lost, and requeued by `gpu-agent run --requeue` with their service carried.
Over time this levels every job's received throughput up from the least served, as Gavel's
max-min policy does in rounds; discretised as least-attained-service (Tiresias) with the
minimum run as its quantum, so nobody thrashes. Only allocations with a checkpoint notice
yield; the daily limit per project holds as for a preemption by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.config import FleetConfig
from fleet.models import Priority
from fleet.placement import Ticket
from fleet.scheduler import PRIORITY_FACTOR


def effective_hours(seconds: float, gpu_type: str, config: FleetConfig) -> float:
    """Service received by holding `gpu_type` for `seconds`, in reference hours."""
    spec = config.catalog.get(gpu_type)
    return max(0.0, seconds) / 3600.0 * (spec.relative_throughput if spec else 1.0)


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


def faster_for(gpu_type: str, config: FleetConfig) -> list[str]:
    """The types whose work `gpu_type` does faster and for no more per unit of work, in a
    pool with it: their running allocations move up to it when it has GPUs spare."""
    spec = config.catalog[gpu_type]
    per_unit = spec.price_per_hour / spec.relative_throughput
    pooled = {t for types in config.pools.values() if gpu_type in types for t in types}
    return sorted(
        t
        for t in pooled
        if config.catalog[t].relative_throughput < spec.relative_throughput
        and config.catalog[t].price_per_hour / config.catalog[t].relative_throughput >= per_unit
    )

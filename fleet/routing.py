"""Pick the GPU type for a request: cheapest per unit of work, or fastest within budget.

A request's duration is time on its reference type (the type it names, or the first type of its
purpose's pool). On another type the same work takes duration x ref_speed / speed, so a card
twice as fast at less than twice the price is the cheaper choice. The speeds are the request's
own (fleet.speeds: its workload's row of the fleet file's table, or what its project's earlier
runs of it measured), else the types' averages. A cheaper type that is full
does not make a request wait while a dearer type of its pool could start it now (found by the
trace simulation: every training job queued for the H100s while the A100s stood idle), unless
it would still finish sooner: a cheaper type whose GPUs come back (at the latest, by the
running allocations' deadlines, with nobody else waiting for them) within the time it saves
on the share of its lease the project is expected to use is worth the wait (on the Philly
trace, work run on A100s while the H100s were full was the largest part of what gpu-agent
paid over the floor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet.borrowing import lender_of
from fleet.budget import admitted_hours, even_shortened
from fleet.config import FleetConfig
from fleet.models import GPURequest, Guardrails, RouteDecision, RouteMode, RouteOption
from fleet.speeds import Speed, job_speeds


@dataclass(frozen=True)
class Refusal:
    """No type is allowed; `reason` says which hard rule stopped each one."""

    reason: str


def estimate(
    request: GPURequest,
    config: FleetConfig,
    gpu_type: str,
    speeds: Mapping[str, Speed] | None = None,
) -> tuple[float, float]:
    """(hours, USD) for the request's work on `gpu_type`, at `speeds` (fleet.speeds; None:
    the fleet file's for its workload)."""
    speeds = job_speeds(config, request.workload) if speeds is None else speeds
    ref = request.gpu_type or config.pool(request.purpose)[0]
    work = request.duration_hours * speeds[ref].value
    spec = config.catalog[gpu_type]
    hours = work / speeds[gpu_type].value
    return hours, spec.price_per_hour * request.count * hours


def _option(
    request: GPURequest,
    config: FleetConfig,
    gpu_type: str,
    remaining_usd: float | None,
    speeds: Mapping[str, Speed],
) -> RouteOption:
    spec = config.catalog[gpu_type]
    hours, cost = estimate(request, config, gpu_type, speeds)
    admitted = admitted_hours(hours, cost / hours, remaining_usd, config.limits.min_lease_share)
    why_not = None
    if request.min_memory_gb is not None and spec.memory_gb < request.min_memory_gb:
        why_not = f"{spec.memory_gb:g} GB < {request.min_memory_gb:g} GB"
    elif request.count > config.gpus_of_type(gpu_type):
        why_not = f"fleet has {config.gpus_of_type(gpu_type)}"
    elif hours > config.limits.max_duration_hours:
        why_not = f"{hours:.1f} h is over the duration limit"
    elif request.budget_limit is not None and cost > request.budget_limit:
        why_not = f"${cost:.2f} > request budget ${request.budget_limit:.2f}"
    elif admitted is None:
        assert remaining_usd is not None
        why_not = (
            f"${cost:.2f} > the ${max(remaining_usd, 0):.2f} the project's remaining "
            "budget admits" + even_shortened(config.limits.min_lease_share)
        )
    lease = hours if admitted is None else admitted
    return RouteOption(
        gpu_type=gpu_type,
        price_per_hour=spec.price_per_hour,
        relative_throughput=speeds[gpu_type].value,
        est_hours=lease,
        est_cost_usd=cost if lease == hours else cost * lease / hours,
        feasible=why_not is None,
        why_not=why_not,
        asked_hours=hours if lease < hours else None,
        speed_source=speeds[gpu_type].source,
    )


def guarded(request: GPURequest, rails: Guardrails | None) -> GPURequest:
    """The request as routing weighs it under the council's guardrails: in budget mode where
    they ask for the cheaper type (a type the request names stays its choice)."""
    if rails is None or not rails.cheaper_type or request.mode is RouteMode.BUDGET:
        return request
    return request.model_copy(update={"mode": RouteMode.BUDGET})


def types_for(request: GPURequest, config: FleetConfig) -> list[str]:
    """The types routing weighs: the purpose's pool, and the type the request names."""
    types = list(config.pool(request.purpose))
    if request.gpu_type and request.gpu_type not in types:
        types.append(request.gpu_type)
    return types


def route(
    request: GPURequest,
    config: FleetConfig,
    remaining_usd: float | None,
    starts_in: Mapping[str, float] | None = None,
    used_share: float = 1.0,
    lenders: Sequence[str] = (),
    learned: Mapping[str, float] | None = None,
) -> RouteDecision | Refusal:
    """The type for `request`. `remaining_usd` (Ledger.remaining_usd with running=False: the
    largest worst case the project's budget admits once its running work has ended, by the
    rule placement applies; None: no budget) rules out the types that cost more, or shortens
    their lease to what it buys (fleet.budget.admitted_hours). `starts_in` (per type, at the
    latest how many hours until the request could start: 0 now, Services.starts_in_hours)
    makes the budget mode take the cheapest type that can start now over a cheaper one it
    would queue for, unless waiting for the cheaper one still finishes no later, for a
    request expected to hold `used_share` of its lease (the project's usage factor,
    fleet.budget); without it, or when none can start now, the cheapest. `lenders`: other
    pools' types that could start it now, where it may borrow (fleet.borrowing): it takes
    the one that finishes soonest when its own choice must wait and would finish later.
    `learned`: what the project's earlier runs of the request's workload measured
    (fleet.speeds.learned_speeds); the request's speeds are otherwise the fleet file's."""
    speeds = job_speeds(config, request.workload, learned)
    options = sorted(  # by price per unit of work, whatever lease the budget leaves
        (_option(request, config, t, remaining_usd, speeds) for t in types_for(request, config)),
        key=lambda o: (_per_unit(o), -o.relative_throughput, o.gpu_type),
    )
    feasible = [o for o in options if o.feasible]
    if request.gpu_type:
        named = next(o for o in options if o.gpu_type == request.gpu_type)
        if not named.feasible:
            offer = (
                f"; {feasible[0].gpu_type} fits at ${feasible[0].est_cost_usd:.2f} "
                f"(--gpu-type {feasible[0].gpu_type})"
                if feasible
                else ""
            )
            return Refusal(f"{named.gpu_type} refused: {named.why_not}{offer}")
        chosen, why = named, "requested type"
    elif not feasible:
        return Refusal(
            "no GPU type fits: " + "; ".join(f"{o.gpu_type}: {o.why_not}" for o in options)
        )
    elif request.mode is RouteMode.PERFORMANCE:
        chosen = max(feasible, key=lambda o: (o.relative_throughput, -o.est_cost_usd))
        why = "fastest within budget"
    else:
        chosen, why = _cheapest_in_time(feasible, starts_in, used_share)
    lent_by = None
    loan = _loan(request, config, remaining_usd, chosen, starts_in, lenders, speeds)
    if loan is not None:
        lent_by = lender_of(loan.gpu_type, config)
        assert lent_by is not None
        sooner = _sooner(loan, chosen, starts_in)
        chosen, why = (
            loan,
            (
                f"borrowed from the {lent_by.value} pool, free now (it finishes sooner {sooner}; "
                "given back after its checkpoint notice when that pool's work comes)"
            ),
        )
    return RouteDecision(
        gpu_type=chosen.gpu_type,
        pool=request.purpose,
        mode=request.mode,
        price_per_hour=chosen.price_per_hour,
        est_hours=chosen.est_hours,
        est_cost_usd=chosen.est_cost_usd,
        reason=f"{why}: {chosen.gpu_type} x{request.count} for {chosen.est_hours:.2f} h, "
        f"${chosen.est_cost_usd:.2f}, {speeds[chosen.gpu_type].describe()}"
        + (
            f" (the project's budget shortens the {chosen.asked_hours:.2f} h lease)"
            if chosen.asked_hours is not None
            else ""
        ),
        alternatives=[o for o in options if o.gpu_type != chosen.gpu_type],
        asked_hours=chosen.asked_hours,
        lent_by=lent_by,
        speed=chosen.relative_throughput,
        speed_source=chosen.speed_source,
    )


def _loan(
    request: GPURequest,
    config: FleetConfig,
    remaining_usd: float | None,
    chosen: RouteOption,
    starts_in: Mapping[str, float] | None,
    lenders: Sequence[str],
    speeds: Mapping[str, Speed],
) -> RouteOption | None:
    """Another pool's type to borrow instead of `chosen`: the feasible lender that finishes
    the work soonest, where it finishes sooner than `chosen`, wait included, and `chosen`
    cannot start now; or where it is no dearer a unit of work either (`[preemption]
    borrow_dearer`: whatever its price, where the project's budget pays for the whole lease
    there, not a shortened one that would end before the work), when `chosen` could.
    Under a levelling policy too (fleet.maxmin): preemption makes room in a full type of its
    own only after the runners' minimum run, and on the Philly trace the research pool's
    work queued for it while the training pool's A100s stood idle."""
    if not lenders:
        return None
    wait = _wait(chosen, starts_in)
    options = [_option(request, config, t, remaining_usd, speeds) for t in lenders]
    if wait <= 0:
        dearer = config.preemption.borrow_dearer
        options = [
            o
            for o in options
            if _per_unit(o) <= _per_unit(chosen) or (dearer and o.asked_hours is None)
        ]
    best = min((o for o in options if o.feasible), key=_work_hours, default=None)
    if best is None or _work_hours(best) >= max(wait, 0.0) + _work_hours(chosen):
        return None
    return best


def _sooner(loan: RouteOption, chosen: RouteOption, starts_in: Mapping[str, float] | None) -> str:
    """Why the loan finishes sooner than `chosen`, and at what price a unit of work."""
    if _wait(chosen, starts_in) > 0:
        return "than waiting for its own"
    more = _per_unit(loan) - _per_unit(chosen)
    price = (
        "for no more a unit of work"
        if more <= 0
        else f"for ${more:.2f} more a unit of work (borrow_dearer)"
    )
    return f"than {chosen.gpu_type} would, {price}"


def _wait(option: RouteOption, starts_in: Mapping[str, float] | None) -> float:
    """Hours until the option's type could start the request (unknown: infinite)."""
    return math.inf if starts_in is None else starts_in.get(option.gpu_type, math.inf)


def _per_unit(option: RouteOption) -> float:
    """USD per unit of work on the option's type."""
    return option.price_per_hour / option.relative_throughput


def _cheapest_in_time(
    feasible: list[RouteOption], starts_in: Mapping[str, float] | None, used_share: float
) -> tuple[RouteOption, str]:
    """The cheapest option that starts now, or a cheaper one that, waiting for its GPUs,
    finishes no later than that one would: waits at most the time it saves on the share
    of the lease it is expected to use. With nothing free now, the cheapest."""
    why = "cheapest per unit of work"
    if starts_in is None:
        return feasible[0], why
    ready = [o for o in feasible if _wait(o, starts_in) <= 0]
    if not ready or ready[0] is feasible[0]:
        return (ready or feasible)[0], why
    free_now = ready[0]
    for o in feasible[: feasible.index(free_now)]:
        wait = _wait(o, starts_in)
        if wait <= used_share * (_work_hours(free_now) - _work_hours(o)):
            return o, (
                f"{why}: {o.gpu_type} is full but frees within {wait:.2f} h, so it "
                f"finishes before {free_now.gpu_type} started now would"
            )
    return free_now, f"{why} free now ({feasible[0].gpu_type} is full)"


def lease_hours(route: RouteDecision, request: GPURequest) -> float:
    """The lease on the routed type (lease_on), or what the project's budget admits where
    it shortened that."""
    if route.asked_hours is not None:  # the budget shortened it
        return route.est_hours
    return lease_on(route.est_hours, request)


def lease_on(est_hours: float, request: GPURequest) -> float:
    """The lease on a type whose estimate for the work is `est_hours`: the hours asked, or
    the estimate where that is longer (a slower type than the reference). Never shorter
    than asked because a type is faster: a speed is an estimate, and a job's pauses,
    loading and checkpoints take their wall time on any type (the estimate still prices
    the request)."""
    return max(est_hours, request.duration_hours)


def _work_hours(option: RouteOption) -> float:
    """How long the request's work takes on the option's type, whatever the budget leases."""
    return option.asked_hours or option.est_hours

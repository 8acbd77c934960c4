"""The recommendation kinds, each with the figures that justify it, in report order."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fleet.config import FleetConfig
from fleet.models import Purpose
from sim.analysis.history import History, Record, _iso
from sim.analysis.plots import PLOTS
from sim.analysis.pools import PoolStats
from sim.analysis.projects import ProjectUsage, cost_of
from sim.analysis.result import Analysis, Recommendation
from sim.analysis.thresholds import (
    HOARD_SHARE,
    IDLE_POOL_SHARE,
    MIN_EVIDENCE_GPU_HOURS,
    UNUSED_SHARE,
)
from sim.analysis.timeseries import held_hours, wait_hours

KIND_ORDER = [
    "pool-short",
    "type-short",
    "inference-on-training-gpus",
    "hoarder",
    "quota-unused",
    "idle-pool",
]


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _waiters(p: PoolStats, graph: dict[str, Any]) -> tuple[str | None, float, float]:
    """The project that waited longest for the pool (graph edge), its hours and the pool's."""
    edges = [e for e in graph["edges"] if e["target"] == f"pool:{p.name}"]
    total = sum(e["wait_hours"] for e in edges)
    top = max(edges, key=lambda e: (e["wait_hours"], e["source"]), default=None)
    if top is None or top["wait_hours"] <= 0:
        return None, 0.0, total
    return str(top["source"]).removeprefix("project:"), float(top["wait_hours"]), total


def pool_short(p: PoolStats, graph: dict[str, Any]) -> Recommendation | None:
    n = p.sustained_shortfall_gpus
    if n <= 0:
        return None
    who, hours, total = _waiters(p, graph)
    most = f"; {who} did {hours:.1f} of the pool's {total:.1f} hours of waiting" if who else ""
    peak = f" (momentarily {p.peak_shortfall_gpus})" if p.peak_shortfall_gpus != n else ""
    p90 = (
        "no request has started yet"
        if p.wait.p90_h is None
        else f"the p90 wait of started requests was {p.wait.p90_h:.1f} h"
    )
    if p.wait.queued:
        p90 += f", {p.wait.queued} still waiting ({p.wait.queued_waited_h:.1f} h so far)"
    if p.wait.cancelled:
        p90 += (
            f", {p.wait.cancelled} cancelled while waiting (after "
            f"{p.wait.cancelled_waited_h:.1f} h in all)"
        )
    text = (
        f"pool {p.name} is short of {n} GPUs at peak{peak}: demand reached "
        f"{p.peak_demand_gpus} GPUs ({p.peak_held_gpus} held + {p.peak_waiting_gpus} waiting) "
        f"at {_iso(p.peak_at)} against a capacity of {p.capacity_gpus} "
        f"({'/'.join(p.gpu_types)}); demand exceeded capacity for "
        f"{p.hours_over_capacity:.1f} h and {p90}{most}: add {n} GPUs or move work "
        "off-peak"
    )
    return Recommendation(
        "pool-short",
        p.name,
        text,
        {
            "pool_wait_hours": _r(total),
            "top_waiting_project": who,
            "top_waiting_project_hours": _r(hours),
            "sustained_shortfall_gpus": n,
            "peak_shortfall_gpus": p.peak_shortfall_gpus,
            "peak_demand_gpus": p.peak_demand_gpus,
            "capacity_gpus": p.capacity_gpus,
            "peak_at": _iso(p.peak_at),
            "hours_over_capacity": _r(p.hours_over_capacity),
            "p90_wait_hours": _r(p.wait.p90_h),
            "waiting_now": p.wait.queued,
            "cancelled_while_waiting": p.wait.cancelled,
        },
        PLOTS["demand_vs_capacity"],
    )


def type_short(
    t: PoolStats, pool: PoolStats, siblings: list[PoolStats], waited: list[Record]
) -> Recommendation | None:
    """A GPU type short at peak beyond what its pool is: the shortage is the type's.
    `waited`: the requests for the type that waited."""
    n = t.sustained_shortfall_gpus
    if n <= pool.sustained_shortfall_gpus:
        return None
    pinned = sum(1 for r in waited if r.pinned)
    if pinned * 2 > len(waited):
        fix = f"let them run on the pool's other types (do not pin --gpu-type {t.name})"
    else:
        fix = (
            f"routing sent them to {t.name} (cheapest per unit of work) however busy it "
            "was: let a request fall back to the pool's other types"
        )
    spare = [
        f"{s.name} held {s.mean_held_gpus:.1f} of {s.capacity_gpus} on average"
        for s in siblings
        if s.capacity_gpus
    ]
    meanwhile = f"; meanwhile {', '.join(spare)}" if spare else ""
    p90 = "" if t.wait.p90_h is None else f", p90 wait {t.wait.p90_h:.1f} h"
    text = (
        f"GPU type {t.name} (pool {pool.name}) is short of {n} GPUs at peak, more than the "
        f"pool ({pool.sustained_shortfall_gpus}): demand reached {t.peak_demand_gpus} "
        f"against {t.capacity_gpus} at {_iso(t.peak_at)}{p90}{meanwhile}; of the "
        f"{len(waited)} requests that waited, {pinned} named {t.name}: {fix}, or add {n} "
        f"{t.name}"
    )
    return Recommendation(
        "type-short",
        t.name,
        text,
        {
            "sustained_shortfall_gpus": n,
            "pool": pool.name,
            "pool_sustained_shortfall_gpus": pool.sustained_shortfall_gpus,
            "peak_demand_gpus": t.peak_demand_gpus,
            "capacity_gpus": t.capacity_gpus,
            "peak_at": _iso(t.peak_at),
            "p90_wait_hours": _r(t.wait.p90_h),
            "waited_requests": len(waited),
            "pinned_requests": pinned,
            "sibling_mean_held_gpus": {s.name: _r(s.mean_held_gpus) for s in siblings},
        },
        PLOTS["demand_by_gpu_type"],
    )


def type_shortages(
    history: History, config: FleetConfig, pools: dict[str, PoolStats], types: dict[str, PoolStats]
) -> list[Recommendation]:
    out = []
    for t in types.values():
        home = next((p for p in Purpose if t.name in config.pools[p]), None)
        if home is None:
            continue
        siblings = [types[s] for s in config.pools[home] if s != t.name and s in types]
        end = history.end
        waited = [r for r in history.records if r.gpu_type == t.name and wait_hours(r, end) > 0]
        rec = type_short(t, pools[home.value], siblings, waited)
        if rec is not None:
            out.append(rec)
    return out


def hoarder(u: ProjectUsage) -> Recommendation | None:
    if u.hoarded_gpu_hours < MIN_EVIDENCE_GPU_HOURS or u.hoarded_share < HOARD_SHARE:
        return None
    util = "no reading" if u.mean_util_pct is None else f"{u.mean_util_pct:.1f}%"
    text = (
        f"project {u.project} held at least {u.hoarded_gpu_hours:.1f} of its "
        f"{u.gpu_hours:.1f} GPU-hours idle ({u.hoarded_share:.0%}); {u.idle_releases} "
        f"allocation(s) were released for idling; mean utilisation {util}: release GPUs "
        "when the work is done, or ask for shorter leases"
    )
    return Recommendation(
        "hoarder",
        u.project,
        text,
        {
            "hoarded_gpu_hours": _r(u.hoarded_gpu_hours),
            "gpu_hours": _r(u.gpu_hours),
            "hoarded_share": _r(u.hoarded_share),
            "idle_gpu_hours": _r(u.idle_gpu_hours),
            "idle_releases": u.idle_releases,
            "mean_util_pct": _r(u.mean_util_pct, 1),
        },
        PLOTS["idle_hoarded"],
    )


def _cheapest_inference(config: FleetConfig, memory: float | None) -> str | None:
    types = [
        t
        for t in config.pools[Purpose.INFERENCE]
        if memory is None or config.catalog[t].memory_gb >= memory
    ]
    return min(
        types,
        key=lambda t: (config.catalog[t].price_per_hour / config.catalog[t].relative_throughput, t),
        default=None,
    )


def _alternative_cost(r: Record, end: float, config: FleetConfig) -> tuple[str, float] | None:
    """The same work on the inference pool's cheapest type per unit of work (routing's rule)."""
    alt = _cheapest_inference(config, r.min_memory_gb)
    if alt is None or r.gpu_type not in config.catalog:
        return None
    spec, used = config.catalog[alt], config.catalog[r.gpu_type]
    hours = held_hours(r, end) * used.relative_throughput / spec.relative_throughput
    return alt, spec.price_per_hour * r.count * hours


def inference_on_training(
    history: History, config: FleetConfig, pools: dict[str, PoolStats]
) -> list[Recommendation]:
    end = history.end
    training, inference = config.pools[Purpose.TRAINING], config.pools[Purpose.INFERENCE]
    found: dict[str, list[Record]] = defaultdict(list)
    for r in history.records:
        if (
            r.purpose is Purpose.INFERENCE
            and r.gpu_type in training
            and r.gpu_type not in inference
            and r.started_at is not None
        ):
            found[r.project].append(r)
    out = []
    for project, rows in sorted(found.items()):
        rec = _inference_rec(project, rows, end, config, pools[Purpose.TRAINING.value])
        if rec is not None:
            out.append(rec)
    return out


def _inference_rec(
    project: str, rows: list[Record], end: float, config: FleetConfig, training: PoolStats
) -> Recommendation | None:
    gpu_h = sum(r.count * held_hours(r, end) for r in rows)
    if gpu_h < MIN_EVIDENCE_GPU_HOURS:
        return None
    cost = sum(cost_of(r, end) for r in rows)
    alts = [_alternative_cost(r, end, config) for r in rows]
    movable = [a for a in alts if a is not None]
    types = sorted({r.gpu_type for r in rows})
    evidence: dict[str, Any] = {
        "gpu_hours": _r(gpu_h),
        "cost_usd": _r(cost, 2),
        "gpu_types": types,
        "allocations": len(rows),
        "training_pool_p90_wait_hours": _r(training.wait.p90_h),
    }
    text = (
        f"project {project}'s inference ran on training GPUs ({'/'.join(types)}): "
        f"{gpu_h:.1f} GPU-hours costing ${cost:.2f}"
    )
    if len(movable) == len(rows):
        alt_cost = sum(c for _, c in movable)
        alt_types = sorted({t for t, _ in movable})
        evidence |= {
            "alternative_gpu_types": alt_types,
            "alternative_cost_usd": _r(alt_cost, 2),
            "saving_usd": _r(cost - alt_cost, 2),
        }
        text += (
            f"; the same work on {'/'.join(alt_types)} (the inference pool's cheapest per "
            f"unit of work) would cost ${alt_cost:.2f} (${cost - alt_cost:.2f} less)"
        )
    else:
        text += f"; {len(rows) - len(movable)} of them need more memory than the inference pool has"
    if training.wait.p90_h:
        text += f", while training requests waited (p90 {training.wait.p90_h:.1f} h)"
    return Recommendation(
        "inference-on-training-gpus",
        project,
        text + ": route it to the inference pool (drop --gpu-type)",
        evidence,
        PLOTS["project_pool_graph"],
    )


def quota_unused(u: ProjectUsage) -> list[Recommendation]:
    out = []
    if u.quota_gpus and u.peak_demand_gpus <= UNUSED_SHARE * u.quota_gpus:
        out.append(
            Recommendation(
                "quota-unused",
                u.project,
                (
                    f"project {u.project}'s quota of {u.quota_gpus} GPUs is never used: its demand "
                    f"peaked at {u.peak_demand_gpus} GPU(s) "
                    f"({u.peak_demand_gpus / u.quota_gpus:.0%}); lower it to "
                    f"{max(1, u.peak_demand_gpus)} or give the room to another project"
                ),
                {
                    "quota_gpus": u.quota_gpus,
                    "peak_demand_gpus": u.peak_demand_gpus,
                    "peak_held_gpus": u.peak_held_gpus,
                },
            )
        )
    if u.budget_usd and u.cost_usd <= UNUSED_SHARE * u.budget_usd:
        out.append(
            Recommendation(
                "quota-unused",
                u.project,
                (
                    f"project {u.project} spent ${u.cost_usd:.2f} of its "
                    f"${u.budget_usd:.2f} budget ({u.cost_usd / u.budget_usd:.0%}) in this "
                    "window: the budget is far above its use"
                ),
                {"budget_usd": _r(u.budget_usd, 2), "spent_usd": _r(u.cost_usd, 2)},
            )
        )
    return out


def idle_pool(p: PoolStats) -> Recommendation | None:
    if p.capacity_gpus <= 0 or p.utilisation > IDLE_POOL_SHARE:
        return None
    spare = p.capacity_gpus - p.peak_demand_gpus
    never = f"; {spare} of its GPUs were never asked for, even at peak" if spare > 0 else ""
    text = (
        f"pool {p.name} held {p.mean_held_gpus:.2f} of its {p.capacity_gpus} GPUs on "
        f"average ({p.utilisation:.0%}){never}: shrink it or lend its GPUs out"
    )
    return Recommendation(
        "idle-pool",
        p.name,
        text,
        {
            "mean_held_gpus": _r(p.mean_held_gpus),
            "capacity_gpus": p.capacity_gpus,
            "utilisation": _r(p.utilisation),
            "peak_demand_gpus": p.peak_demand_gpus,
            "never_requested_gpus": max(0, spare),
        },
        PLOTS["demand_vs_capacity"],
    )


def recommend(history: History, config: FleetConfig, a: Analysis) -> list[Recommendation]:
    if not history.records:
        return []
    pools = a.pools
    recs = [
        r
        for p in pools.values()
        for r in (pool_short(p, a.bottlenecks), idle_pool(p))
        if r is not None
    ]
    recs += type_shortages(history, config, pools, a.gpu_types)
    recs += inference_on_training(history, config, pools)
    recs += [r for u in a.projects if (r := hoarder(u)) is not None]
    recs += [r for u in a.projects for r in quota_unused(u)]
    return sorted(recs, key=lambda r: KIND_ORDER.index(r.kind))

"""The fleet as JSON: what `gpu-agent status`, the Orchestrator and the status graph return."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from fleet.ledger.rows import LedgerRow, term_open
from fleet.left_running import left_running
from fleet.models import utc
from fleet.monitoring import OUTSIDE, condition
from fleet.monitors import Monitors, describe_owner
from fleet.services import Services


def scoped(fleet: dict[str, Any], project: str) -> dict[str, Any]:
    """The fleet JSON as one project sees it: its own allocations; GPUs other projects hold
    show as held, without the allocation."""
    fleet["allocations"] = [a for a in fleet["allocations"] if a["project"] == project]
    for gpu in fleet["gpus"]:
        if gpu.get("project") not in (None, project):
            gpu["allocation_id"] = None
    return fleet


def enforced(svc: Services, row: LedgerRow) -> str | None:
    """What the monitor enforces on a live allocation where the backend reads no utilisation
    (Slurm, Ray: no idle release): its lease and budget, and where `gpu-agent run` runs its
    work, the command's end too; None where the monitor enforces everything."""
    limited = getattr(svc.backend, "monitoring", None)
    if limited is None or row.state == "released":
        return None
    if row.state == "active" and svc.work(svc.ledger.lease(row.id)) == "running":
        return "lease and budget; released when its `gpu-agent run` command ends"
    return "lease and budget only: no idle release (its work does not run under `gpu-agent run`)"


def command_of(svc: Services, row: LedgerRow) -> str | None:
    """What `gpu-agent run` says of a live allocation's latest command (None: none ran
    under it), so that a command a dead run left on its GPUs is seen."""
    if row.state != "active":
        return None
    lease = svc.ledger.lease(row.id)
    owner = lease.command_owner
    if owner is None:
        return None
    run = f"gpu-agent {describe_owner(owner)}"
    if lease.command_ended_at is not None:
        return f"exited under {run}: its work is done"
    if svc.work(lease) == "running":
        return f"running under {run}"
    left = left_running(svc.ledger, row.id)
    if left is not None:
        return (
            f"left running by {run}, which died (process group {left.record.pgid}): its end "
            "stops it"
        )
    if svc.left_by_a_dead_run(row.id):
        return f"{run} died or went quiet: the command may still run, and nothing here stops it"
    return f"ended with {run}, which died"


def _ends(r: LedgerRow) -> dict[str, Any]:
    """Why a live allocation ends at its deadline (its lease, a budget, a preemption, a
    release asked), and where its lease is held a term at a time (term_open), the term and
    the end of the lease asked, which renewals reach while its GPUs work."""
    term = term_open(r.state, r.renew_hours, r.lease_end, r.deadline, r.deadline_reason)
    asked = None if r.started_at is None else r.started_at + r.hours * 3600.0
    return {
        "deadline_reason": None
        if r.state != "active" or r.deadline_reason is None
        else r.deadline_reason.value,
        "term_hours": r.renew_hours if term else None,
        "lease_asked_end": utc(asked).isoformat() if term and asked is not None else None,
    }


def fleet_status(svc: Services) -> dict[str, Any]:
    """Every GPU with its holder and live reading, every allocation: JSON, for the CLI's
    `status`, the status graph (MCP) and the Orchestrator."""
    now = svc.clock.now()
    holders = svc.ledger.holders()
    samples = svc.sample([g.uuid for g in svc.gpus], now, {g: p for g, (_, p) in holders.items()})
    unhealthy = svc.check_health()
    kept = svc.unavailable(holders)  # Slurm: drained or down nodes, others' jobs
    jobs = svc.ledger.scheduler_jobs()
    monitors = Monitors(svc.ledger)
    watchers, wall = monitors.watchers(), time.time()
    gpus = []
    for gpu, sample in zip(svc.gpus, samples, strict=True):
        aid, project = holders.get(gpu.uuid, (None, None))
        gpus.append(
            {
                "uuid": gpu.uuid,
                "type": gpu.gpu_type,
                "node": gpu.node,
                "index": gpu.index,
                "model": gpu.model_name,
                "memory_gb": gpu.memory_gb,
                "mig": gpu.mig,
                "allocation_id": aid,
                "project": project,
                "util_pct": sample.util_pct,
                "mem_used_gb": sample.mem_used_gb,
                "temp_c": sample.temp_c,
                "power_w": sample.power_w,
                "throttled": sample.throttled,
                "processes": None
                if sample.processes is None
                else [p.model_dump() for p in sample.processes],
                "condition": (
                    state := kept[gpu.uuid]
                    if aid is None and gpu.uuid in kept
                    else condition(sample, aid is not None, svc.config.monitor)
                ),
                "unhealthy": unhealthy.get(gpu.uuid),
                "placeable": gpu.gpu_type in svc.config.catalog
                and gpu.uuid not in unhealthy
                and gpu.uuid not in kept
                and state != OUTSIDE,
            }
        )
    allocations = [
        {
            "id": r.id,
            "project": r.project,
            "thread_id": r.thread_id,
            "gpu_ids": r.gpu_ids,
            "gpu_type": r.gpu_type,
            "count": r.count,
            "state": r.state,
            "nodes": r.nodes,
            "price_per_hour": r.price_per_hour,
            "enqueued_at": utc(r.enqueued_at).isoformat(),
            "started_at": utc(r.started_at).isoformat() if r.started_at else None,
            "lease_end": utc(r.lease_end).isoformat() if r.lease_end else None,
            "deadline": utc(r.deadline).isoformat() if r.deadline else None,
            **_ends(r),
            "released_at": utc(r.released_at).isoformat() if r.released_at else None,
            "reason": r.release_reason.value if r.release_reason else None,
            "cost_usd": r.cost_usd,
            # live only: whether a process runs its thread (fleet.monitors), and which
            "monitored": None
            if r.state == "released"
            else monitors.alive(watchers.get(r.id), wall),
            "monitor": None
            if r.state == "released" or r.id not in watchers
            else watchers[r.id].describe(wall),
            # the Slurm job that holds it: its id, node and the GPU indices Slurm chose
            "job": asdict(jobs[r.id]) if r.id in jobs else None,
            # what the monitor enforces on it, where that is less than everything
            "enforced": enforced(svc, r),
            "command": command_of(svc, r),
        }
        for r in svc.ledger.allocations()
    ]
    return {
        "backend": svc.backend.name,
        "problem": getattr(svc.backend, "problem", None),
        # what the monitor can enforce on this backend, where it is less than everything
        "monitoring": getattr(svc.backend, "monitoring", None),
        "unpriced_types": sorted({g.gpu_type for g in svc.unpriced}),
        "now": utc(now).isoformat(),
        "gpus": gpus,
        "allocations": allocations,
    }

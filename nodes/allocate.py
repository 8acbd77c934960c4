"""Reserve GPUs in the ledger, or take a place in the fair queue.

Idempotent on (thread_id, request_id): a re-run after a crash finds the allocation it made.
"""

from __future__ import annotations

from langgraph.runtime import Runtime

from fleet import monitoring
from fleet.faults import fault
from fleet.ledger.rows import Resumed, allocation_id
from fleet.models import (
    Event,
    EventKind,
    GPURequest,
    Guardrails,
    MonitorState,
    ReleaseReason,
    Status,
    utc,
)
from fleet.placement import Kind
from fleet.services import Services
from nodes import audit
from nodes.context import Context, services_for
from nodes.state import State, guardrails_of, request_of


def term_hours(rails: Guardrails | None, request: GPURequest, svc: Services) -> float | None:
    """The term a guarded lease is held for (None: whole; fleet.monitoring.term_hours)."""
    if rails is None or rails.lease_hours is None:
        return None
    monitor = svc.config.monitor
    lead = monitoring.renewal_lead_s(monitor, request.notice_seconds, svc.scheduler_holds)
    return monitoring.term_hours(rails.lease_hours, lead)


def allocate(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    request = request_of(state)
    thread_id = state.get("thread_id") or "anonymous"
    aid = allocation_id(thread_id, request.request_id)
    now = svc.clock.now()
    rails = guardrails_of(state)  # a lease held a term at a time, where they say so
    result = svc.ledger.place(
        request,
        state["route"],
        thread_id,
        now,
        svc.placeable(),
        svc.topology,
        approval=audit.approval(svc, state, request),
        # in the placement's transaction: a live allocation always has its monitor
        first=lambda db: svc.watch(aid, thread_id, db),
        renew_hours=term_hours(rails, request, svc),
    )
    fault("allocate:placed")
    svc.moved(result.moved)  # the budget now ends these sooner: their monitors hear at once
    decision, row = result.decision, result.row
    if decision.kind in (Kind.DENY, Kind.GONE):
        svc.unwatch(aid)  # nothing live to monitor
    if decision.kind is Kind.DENY:
        audit.denial(svc, state, request, "rules", decision.reason)
        return {"status": Status.DENIED, "reason": decision.reason, "allocation_id": aid}
    assert row is not None
    if decision.kind is Kind.GONE:
        return {
            "status": Status.RELEASED,
            "reason": decision.reason,
            "allocation_id": aid,
            "release": row.to_release(),
            "cost_usd": row.cost_usd or 0.0,
        }
    if decision.kind is Kind.QUEUE:
        svc.reclaim(row)  # its pool's GPUs lent to other pools' work come back (borrowing)
        svc.preempt_for(row)  # max-min: those served more than the line yield (fleet.maxmin)
        update: State = {"status": Status.QUEUED, "reason": decision.reason, "allocation_id": aid}
        if state.get("status") != Status.QUEUED:
            update["events"] = [
                Event(at=utc(now), kind=EventKind.QUEUED, message=f"waiting: {decision.reason}")
            ]
        return update
    problem = svc.reserve(row, request)  # Ray: its placement group; Slurm: its job
    if problem is not None:  # it never held anything: charged nothing
        svc.release(aid, ReleaseReason.CANCELLED, at=row.started_at)
        give_up = request.give_up_at(row.enqueued_at)
        if give_up is not None and svc.clock.now() >= give_up:  # the job waited past it
            reason = f"not started within {request.max_wait_minutes:g} min: {problem}"
            return {"status": Status.TIMED_OUT, "reason": reason, "allocation_id": aid}
        return {"status": Status.DENIED, "reason": problem, "allocation_id": aid}
    if svc.scheduler_holds:  # Slurm: it starts when its job did (Ledger.record_job)
        row = svc.ledger.get(aid)
    allocation = row.to_allocation()
    resumed = (
        Resumed(0.0, False)
        if request.resumes is None
        else svc.ledger.resume(
            request.resumes, aid, row.enqueued_at, allocation.started_at.timestamp()
        )
    )
    waited = (allocation.started_at.timestamp() - row.enqueued_at) / 3600.0
    note = f" (waited {waited:.1f} h)" if waited > 0 else ""
    if row.renew_hours is not None:  # held a term at a time
        note += f", renewed while its GPUs work, up to {row.hours:.2f} h"
    if row.budget_cuts:
        assert row.deadline is not None
        note += f"; its project's budget runs out at {utc(row.deadline):%Y-%m-%d %H:%M} UTC"
    return {
        "status": Status.ALLOCATED,
        "reason": decision.reason,
        "allocation_id": aid,
        "allocation": allocation,
        "monitor": MonitorState(
            last_tick_at=allocation.started_at,
            longest_pause_s=resumed.pause_s,
            works_while_idle=resumed.working,
            guard_spared=resumed.idle_released,
        ),
        "events": [
            Event(
                at=allocation.started_at,
                kind=EventKind.PLACED,
                message=f"{allocation.count} x {allocation.gpu_type} on "
                f"{allocation.node} until {allocation.lease_end:%Y-%m-%d %H:%M} UTC"
                f"{note}",
            )
        ],
    }

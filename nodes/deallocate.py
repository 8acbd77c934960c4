"""Release: free the GPUs, charge the project, write history. The ledger makes it happen once."""

from __future__ import annotations

from langgraph.runtime import Runtime

from fleet.faults import fault
from fleet.models import Event, EventKind, ReleaseReason, Status
from fleet.services import Services
from nodes.context import Context, services_for
from nodes.state import State


def _free_of_its(gpu_ids: list[str], svc: Services) -> list[str]:
    """The released allocation's GPUs that no allocation holds now, the ones to reset: on a
    step re-run after a crash, or after an explicit release, the next allocation may hold
    them already, and a reset would undo its throttle. (Reset after the release, so that a
    backend that fails to reset cannot keep the GPUs held.)"""
    held = svc.ledger.holders()
    return [g for g in gpu_ids if g not in held]


def deallocate(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    allocation = state["allocation"]
    at = state.get("release_at")
    when = at.timestamp() if at is not None else svc.clock.now()
    reason = ReleaseReason(state["release_reason"])  # a plain str from a Postgres checkpoint
    release, now_freed = svc.ledger.release_once(allocation.id, reason, when, by="monitor")
    fault("deallocate:released")
    svc.backend.reset(_free_of_its(allocation.gpu_ids, svc))
    svc.free(allocation.id)
    fault("deallocate:freed")
    svc.forget(allocation.id)
    if now_freed:  # whoever released it earlier has woken the queue
        svc.wake_waiters(allocation.id)
    return {
        "status": Status.RELEASED,
        "reason": f"released: {release.reason.value}",
        "release": release,
        "cost_usd": release.cost_usd,
        "events": [
            Event(
                at=release.released_at,
                kind=EventKind.RELEASED,
                message=f"after {release.hours:.2f} h ({release.reason.value}), "
                f"charged ${release.cost_usd:.2f}",
            )
        ],
    }

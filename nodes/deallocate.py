"""Release: free the GPUs, charge the project, write history. The ledger makes it happen once."""

from __future__ import annotations

import logging

from langgraph.runtime import Runtime

from fleet.errors import GPUAgentError
from fleet.faults import fault
from fleet.left_running import end_with
from fleet.models import Event, EventKind, ReleaseReason, Status
from fleet.services import Services
from fleet.supervise import still_running
from nodes.context import Context, services_for
from nodes.state import State


def _reset(aid: str, gpu_ids: list[str], svc: Services) -> None:
    """Restores what the allocation's monitor lowered (a throttle, a power limit) before the
    release, while the GPUs are still its own, so that the next holder never inherits it;
    only GPUs no other allocation holds, since on a step re-run after a crash, or after an
    explicit release, the next allocation may hold them already and a reset would undo its
    throttle. A backend that fails to reset keeps no GPUs held: the release goes on, and
    the start-up's sweep (graph/records.py) restores what is left."""
    held = svc.ledger.holding(gpu_ids)
    mine = [g for g in gpu_ids if held.get(g, aid) == aid]
    try:
        svc.backend.reset(mine)
    except (GPUAgentError, OSError) as exc:
        logging.getLogger(__name__).warning("allocation %s: GPUs not reset: %s", aid, exc)


def deallocate(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    allocation = state["allocation"]
    at = state.get("release_at")
    when = at.timestamp() if at is not None else svc.clock.now()
    reason = ReleaseReason(state["release_reason"])  # a plain str from a Postgres checkpoint
    gave_up = svc.await_run(allocation.id, reason)  # a `run --allocation` of another process
    stopped = end_with(svc.ledger, allocation.id)  # before its GPUs can be placed again
    svc.stop_supervised(allocation.id)  # a live `gpu-agent run`'s command, in this process
    _reset(allocation.id, allocation.gpu_ids, svc)
    release, now_freed = svc.ledger.release_once(allocation.id, reason, when, by="monitor")
    fault("deallocate:released")
    svc.free(allocation.id)
    fault("deallocate:freed")
    svc.forget(allocation.id)
    if now_freed:  # whoever released it earlier has woken the queue
        svc.wake_waiters(allocation.id)
    events = [
        Event(
            at=release.released_at,
            kind=EventKind.RELEASED,
            message=f"after {release.hours:.2f} h ({release.reason.value}), "
            f"charged ${release.cost_usd:.2f}",
        )
    ]
    if gave_up:
        said = still_running(allocation.id)
        events.append(Event(at=release.released_at, kind=EventKind.COMMAND, message=said))
    if stopped is not None:
        said = stopped.said(allocation.id)
        events.append(Event(at=release.released_at, kind=EventKind.COMMAND, message=said))
    return {
        "status": Status.RELEASED,
        "reason": release.said,
        "release": release,
        "cost_usd": release.cost_usd,
        "events": events,
    }

"""Wait for a fair turn: sleep one poll, then allocate tries again (on another type of the
pool where `[scheduler] move_queued` lets it move); give up after max wait."""

from __future__ import annotations

from langgraph.runtime import Runtime

from fleet.clock import sleep_until
from fleet.models import GPURequest, ReleaseReason, RouteDecision, Status
from fleet.routing import guarded
from fleet.services import Services
from nodes.context import Context, services_for
from nodes.state import State, guardrails_of, request_of


def wait(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    request = request_of(state)
    aid = state["allocation_id"]
    svc.watch(aid, state.get("thread_id") or "anonymous")
    row = svc.ledger.get(aid)
    if row.state == "released":  # cancelled while waiting
        svc.forget(aid)
        return {
            "status": Status.RELEASED,
            "reason": "cancelled while queued",
            "release": row.to_release(),
            "cost_usd": 0.0,
        }
    if row.state == "active":  # placed before a crash, unrecorded: allocate finds it now
        return _placed_on(svc, state, request, row.gpu_type)
    wake_at = svc.clock.now() + svc.config.scheduler.poll_seconds
    give_up = request.give_up_at(row.enqueued_at)
    if give_up is not None:
        wake_at = min(wake_at, give_up)
    sleep_until(svc.clock, wake_at, svc.waker(aid))
    svc.check_watched(aid)
    if give_up is not None and svc.clock.now() >= give_up:
        svc.ledger.release(aid, ReleaseReason.CANCELLED, svc.clock.now())
        svc.forget(aid)
        return {
            "status": Status.TIMED_OUT,
            "reason": f"not placed within {request.max_wait_minutes:g} min "
            f"({state.get('reason', 'no capacity')})",
        }
    return _moved(svc, state, request)


def _moved(svc: Services, state: State, request: GPURequest) -> State:
    """The route to another type of its pool that could start it now, where routing now
    prefers one (a queued request is not tied to the type it was first routed to)."""
    route = state.get("route")
    if not svc.config.scheduler.move_queued or request.gpu_type is not None or route is None:
        return {}
    decision = svc.route(guarded(request, guardrails_of(state)))
    if not isinstance(decision, RouteDecision) or decision.gpu_type == route.gpu_type:
        return {}
    starts = svc.starts_in_hours([decision.gpu_type], request.count)
    return {"route": decision} if starts[decision.gpu_type] <= 0 else {}


def _placed_on(svc: Services, state: State, request: GPURequest, gpu_type: str) -> State:
    """The route to the type the ledger placed it on, where that is not the thread's: a move
    while queued (`_moved`) that a crash kept from its checkpoint, the wait's being written
    only when it ends (graph.orchestrator.Orchestrator._wait_in_queue)."""
    route = state.get("route")
    if route is None or route.gpu_type == gpu_type:
        return {}
    on_type = guarded(request, guardrails_of(state)).model_copy(update={"gpu_type": gpu_type})
    decision = svc.route(on_type)
    if not isinstance(decision, RouteDecision):  # the thread's route stands, as it was
        return {}
    why = decision.reason.partition(": ")[2]
    return {"route": decision.model_copy(update={"reason": f"moved while queued: {why}"})}

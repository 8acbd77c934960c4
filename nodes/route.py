"""Choose the GPU type and price. Validate already applied the hard rules; they are checked
again here because budgets can change while the council deliberates."""

from __future__ import annotations

from langgraph.runtime import Runtime

from fleet.models import GPURequest, RouteMode, Status
from fleet.routing import Refusal
from nodes import audit
from nodes.context import Context, services_for
from nodes.progress import report
from nodes.state import State, request_of


def _guarded(request: GPURequest, state: State) -> GPURequest:
    """The request as routing weighs it: in budget mode where the council's guardrails ask
    for the cheaper type (a type the request names stays its choice)."""
    decision = state.get("council")
    rails = decision.guardrails if decision is not None else None
    if rails is None or not rails.cheaper_type or request.mode is RouteMode.BUDGET:
        return request
    return request.model_copy(update={"mode": RouteMode.BUDGET})


def route(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    request = request_of(state)
    routed = _guarded(request, state)
    decision = svc.route(routed)
    if isinstance(decision, Refusal):
        audit.denial(svc, state, request, "rules", decision.reason)
        return {"status": Status.DENIED, "reason": f"refused: {decision.reason}"}
    if routed is not request:
        decision.reason += " (the council's guardrail: the cheaper type, not the fastest)"
    report(
        runtime,
        "route",
        f"route: {request.count} x {decision.gpu_type} at "
        f"${decision.price_per_hour:.2f}/GPU-h, about {decision.est_hours:.2f} h, "
        f"${decision.est_cost_usd:.2f} ({decision.reason})",
        gpu_type=decision.gpu_type,
        est_cost_usd=decision.est_cost_usd,
    )
    return {"route": decision}

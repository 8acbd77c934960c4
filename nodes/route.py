"""Choose the GPU type and price. Validate already applied the hard rules; they are checked
again here because budgets can change while the council deliberates. The route the council
priced stands if nothing it read changed since and no review came between (Services.route)."""

from __future__ import annotations

from langgraph.runtime import Runtime

from fleet.models import CouncilOutcome, Status
from fleet.routing import Refusal, guarded
from nodes import audit
from nodes.context import Context, services_for
from nodes.progress import report, streaming
from nodes.state import State, guardrails_of, request_of


def route(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    request = request_of(state)
    decided = state.get("council")
    routed = guarded(request, guardrails_of(state))
    reviewed = decided is None or decided.outcome is CouncilOutcome.SPLIT  # time passed
    decision = svc.route(routed, again=not reviewed)
    if isinstance(decision, Refusal):
        audit.denial(svc, state, request, "rules", decision.reason)
        return {"status": Status.DENIED, "reason": f"refused: {decision.reason}"}
    if routed is not request:  # a copy: Services.route may give the same route again
        guardrail = " (the council's guardrail: the cheaper type, not the fastest)"
        decision = decision.model_copy(update={"reason": decision.reason + guardrail})
    if streaming(runtime):  # the line is built only for someone who reads it
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

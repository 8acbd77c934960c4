"""Convene the council on the request, given the project's standing and the fleet's load."""

from __future__ import annotations

from langgraph.runtime import Runtime

from council.features import build_features, cheapest, cost_pressure, is_critical, routed
from council.voting import auto_approval, convene, small
from fleet.models import CouncilOutcome, GPURequest, Priced, RouteDecision, Status
from fleet.routing import Refusal
from fleet.services import Services
from fleet.validation import refusal
from nodes import audit
from nodes.context import Context, council_of, services_for
from nodes.progress import report, streaming, votes
from nodes.state import State, request_of


def _priced(request: GPURequest, svc: Services, route: RouteDecision | Refusal) -> Priced:
    """The route the request would take now, which the cost member judges; where routing
    refuses it (the route node then says why), the cheapest type that does the work."""
    return (
        cheapest(request, svc.config)
        if isinstance(route, Refusal)
        else routed(route, request.count)
    )


def council(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    request = request_of(state)
    settings = svc.config.council
    remaining = svc.ledger.remaining_usd(request.project)  # what it admits now, as trained
    route = svc.route(request)  # on the budget once the running work has ended, as the rules
    refused = refusal(
        request, svc.config, svc.ledger.remaining_usd(request.project, running=False), route
    )
    if refused:  # the budget changed since validate: the rules decide, not the council
        audit.denial(svc, state, request, "rules", refused)
        return {"status": Status.DENIED, "reason": refused}
    priced = _priced(request, svc, route)
    worst = priced.cost_usd
    critical = is_critical(request)
    if small(request.count, worst, cost_pressure(worst, remaining), critical, settings):
        decision = auto_approval(request.count, worst, settings)  # no record needed
        report(runtime, "council", f"council: {decision.summary}")
        return {"council": decision.model_copy(update={"priced": priced})}
    now = svc.clock.now()
    stats = svc.ledger.project_stats(request.project, now, settings.history_events)
    held = svc.ledger.held_by_type()
    features = build_features(request, svc.config, stats, held, now, remaining, priced)
    decision = convene(council_of(svc), features, critical, settings)
    decision = decision.model_copy(update={"priced": priced})
    if streaming(runtime):  # the line is built only for someone who reads it
        report(
            runtime,
            "council",
            "council: "
            + ", ".join(
                f"{v.member} {v.verdict.value} ({v.probability:.2f})" for v in decision.votes
            )
            + f" -> {decision.summary}",
            votes=votes(decision),
        )
    update: State = {"council": decision}
    if decision.outcome is CouncilOutcome.DENIED:
        update |= {"status": Status.DENIED, "reason": f"council: {decision.summary}"}
        audit.denial(svc, state, request, "council", decision.summary)
    elif decision.outcome is CouncilOutcome.SPLIT:
        update |= {"status": Status.PENDING_REVIEW, "reason": f"council: {decision.summary}"}
        audit.asked(svc, state, request, decision.summary)
    return update

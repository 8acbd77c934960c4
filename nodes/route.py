"""Choose the GPU type and price; the budget and quota rules refuse here."""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime

from fleet.models import Status
from fleet.routing import Refusal
from fleet.routing import route as choose_route
from nodes.context import Context, services_for
from nodes.state import State, request_of


def route(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    svc = services_for(runtime)
    request = request_of(state)
    quota = svc.config.quotas.max_gpus(request.project)
    if quota is not None and request.count > quota:
        return {"status": Status.DENIED,
                "reason": f"quota: {request.project} may hold at most {quota} GPUs"}
    decision = choose_route(request, svc.config, svc.ledger.remaining_usd(request.project))
    if isinstance(decision, Refusal):
        return {"status": Status.DENIED, "reason": f"refused: {decision.reason}"}
    return {"route": decision}

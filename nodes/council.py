"""Convene the council on the request, given the project's standing and the fleet's load."""

from __future__ import annotations

from collections import Counter
from typing import Any

from langgraph.runtime import Runtime

from council.features import build_features, is_critical
from council.voting import convene
from fleet.models import Outcome, Status
from fleet.validation import refusal
from nodes.context import Context, services_for
from nodes.state import State, request_of


def council(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    svc = services_for(runtime)
    request = request_of(state)
    settings = svc.config.council
    refused = refusal(request, svc.config, svc.ledger.remaining_usd(request.project))
    if refused:  # the budget changed since validate: the rules decide, not the council
        return {"status": Status.DENIED, "reason": refused}
    now = svc.clock.now()
    stats = svc.ledger.project_stats(request.project, now, settings.history_events)
    types = {g.uuid: g.gpu_type for g in svc.inventory}
    held = Counter(types[g] for g in svc.ledger.holders() if g in types)
    features = build_features(request, svc.config, stats, dict(held), now)
    decision = convene(svc.council, features, is_critical(request), settings)
    update: dict[str, Any] = {"council": decision}
    if decision.outcome is Outcome.DENIED:
        update |= {"status": Status.DENIED, "reason": f"council: {decision.summary}"}
    elif decision.outcome is Outcome.SPLIT:
        update |= {"status": Status.PENDING_REVIEW, "reason": f"council: {decision.summary}"}
    return update

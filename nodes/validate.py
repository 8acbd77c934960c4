"""Check the request; an invalid one ends the run with one clear reason."""

from __future__ import annotations

from typing import Any

from langgraph.runtime import Runtime

from fleet.errors import InvalidInput
from fleet.models import Status
from fleet.validation import check_against_fleet, parse_request
from nodes.context import Context, services_for
from nodes.state import State


def validate(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    svc = services_for(runtime)
    thread_id = runtime.execution_info.thread_id if runtime.execution_info else None
    try:
        request = parse_request(state["request"])
        check_against_fleet(request, svc.config)
    except InvalidInput as exc:
        return {"status": Status.INVALID, "reason": str(exc), "thread_id": thread_id or ""}
    return {"request": request, "status": Status.PENDING, "thread_id": thread_id or ""}

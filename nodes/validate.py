"""Check the request. Invalid input ends the run with one clear reason; a request that a hard
rule (quota, budget) refuses ends denied before the council is troubled with it."""

from __future__ import annotations

from langgraph.runtime import Runtime

from fleet.access import Identity
from fleet.errors import Forbidden, InvalidInput
from fleet.ledger.rows import allocation_id
from fleet.models import GPURequest, Status
from fleet.validation import check_against_fleet, parse_request, refusal
from nodes import audit
from nodes.context import Context, services_for
from nodes.state import State


def validate(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    thread_id = runtime.execution_info.thread_id if runtime.execution_info else None
    update: State = {"thread_id": thread_id or ""}
    if "status" in state:  # validate runs once a thread: this input came after another's
        return update | {"status": Status.INVALID, "reason": _carried(thread_id, state)}
    try:
        if "request" not in state:  # the server's input is the caller's
            raise InvalidInput("the input has no request: give {'request': {...}}")
        request = parse_request(state["request"])
        check_against_fleet(request, svc.config)
    except InvalidInput as exc:
        return update | {"status": Status.INVALID, "reason": str(exc)}
    who = getattr(runtime.context, "identity", None)  # an in-process caller's (LocalContext)
    if who is not None:
        try:
            who.check_project(request.project, "request GPUs")
        except Forbidden as exc:
            return update | {"status": Status.DENIED, "reason": str(exc)}
        asker = _asker(request, who, resumed=getattr(runtime.context, "resumed", False))
        if asker != request.requested_by:  # the Orchestrator stamped it already
            request = request.model_copy(update={"requested_by": asker})
    update["request"] = request
    if request.resumes is not None:
        mine = allocation_id(thread_id, request.request_id) if thread_id else None
        problem = svc.ledger.resumable(request.project, request.resumes, mine)
        if problem is not None:
            return update | {"status": Status.INVALID, "reason": problem}
    refused = refusal(request, svc.config, svc.ledger.remaining_usd(request.project, running=False))
    if refused:
        audit.denial(svc, update | state, request, "rules", refused)
        return update | {"status": Status.DENIED, "reason": refused}
    return update | {"status": Status.PENDING}


def _carried(thread_id: str | None, state: State) -> str:
    """Why a new request on a thread that carried one is refused: its input landed on the
    other's state, whose allocation it would take for its own. (The Orchestrator refuses a
    thread name in use before it runs, graph.auth a new request on a server thread.)"""
    held = f", allocation {state['allocation_id']}" if "allocation_id" in state else ""
    return (
        f"thread {thread_id!r} already carried a request ({state['status']}{held}): "
        "make a new thread for a new request"
    )


def _asker(request: GPURequest, who: Identity, *, resumed: bool) -> str | None:
    """Who asked. A caller's new request is theirs (an admin's: whom it names, as a worker
    runs a job for its submitter), whatever it says. A resumed thread's request is the one
    its first caller submitted, stamped then (an Orchestrator stamps it into the input, whose
    checkpoint a failure in validate leaves): validate running again for whoever resumes it
    (another member of the project, a worker adopting it) must not make them its asker."""
    return request.requested_by if resumed else who.asker(request.requested_by)

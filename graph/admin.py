"""Two small graphs beside the request graph, for callers that run without a thread (MCP):
`gpu-status` (the fleet and its allocations) and `gpu-release` (release an allocation now).

Over MCP the LangGraph server runs every tool call statelessly: a call can never be resumed,
so nothing that may stop for a human review belongs there. These two never stop; the request
graph does only when the council splits (small requests are auto-approved), and its call lasts
until the allocation ends. Behind a server with tokens (graph/auth.py) a member or approver
sees only their project's allocations and releases only those: another project's allocation
is answered like one that does not exist. A refusal (a malformed id or project name, an
unknown or foreign allocation, a context that is not the server's own) is the result's
`error`, one line, never an exception: over MCP an exception is a traceback in the log.
"""

from __future__ import annotations

from typing import Any

from langgraph.config import get_config
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from typing_extensions import TypedDict

from fleet import names
from fleet.errors import GPUAgentError
from fleet.models import ReleaseReason
from fleet.supervise import still_running
from graph.auth import caller_of
from graph.status import fleet_status, scoped
from nodes.context import Context, services_for


class StatusInput(TypedDict, total=False):
    project: str  # only this project's allocations


class StatusState(StatusInput, total=False):
    fleet: dict[str, Any]
    error: str


class ReleaseInput(TypedDict):
    allocation_id: str


class ReleaseState(ReleaseInput, total=False):
    release: dict[str, Any]
    error: str


def read_status(state: StatusState, runtime: Runtime[Context]) -> dict[str, Any]:
    project = state.get("project")
    try:
        if project not in (None, ""):
            names.check("project", project)
        svc = services_for(runtime)
    except GPUAgentError as exc:
        return {"error": str(exc)}
    fleet = fleet_status(svc)
    who = caller_of(get_config())
    if who is not None and not who.admin:  # a token's project: its own allocations only
        return {"fleet": scoped(fleet, who.project or "")}
    if project:
        fleet["allocations"] = [a for a in fleet["allocations"] if a["project"] == project]
    return {"fleet": fleet}


def release_now(state: ReleaseState, runtime: Runtime[Context]) -> dict[str, Any]:
    aid = state.get("allocation_id")
    try:
        names.check("allocation id", aid)
        svc = services_for(runtime)
        row = svc.ledger.get(aid)  # InvalidInput: no allocation 'a-...'
        who = caller_of(get_config())
        if who is not None:
            who.check_sees(row.project, f"no allocation {aid!r}")
        release, _, gave_up = svc.release_asked(
            row.id, ReleaseReason.EXPLICIT, who.name if who is not None else None
        )
    except GPUAgentError as exc:
        return {"error": str(exc)}
    out: dict[str, Any] = {"release": release.model_dump(mode="json")}
    if gave_up:  # Services.release_asked
        out["warning"] = still_running(release.allocation_id)
    return out


def _one_step(
    state: type[Any], input_schema: type[Any], name: str, node: Any
) -> CompiledStateGraph[Any, Context, Any, Any]:
    builder = StateGraph(state, context_schema=Context, input_schema=input_schema)
    builder.add_node(name.removeprefix("gpu-"), node)
    builder.add_edge(START, name.removeprefix("gpu-"))
    builder.add_edge(name.removeprefix("gpu-"), END)
    return builder.compile(name=name)


status_graph = _one_step(StatusState, StatusInput, "gpu-status", read_status)
release_graph = _one_step(ReleaseState, ReleaseInput, "gpu-release", release_now)

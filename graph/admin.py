"""Two small graphs beside the request graph, for callers that run without a thread (MCP):
`gpu-status` (the fleet and its allocations) and `gpu-release` (release an allocation now).

Over MCP the LangGraph server runs every tool call statelessly: a call can never be resumed,
so nothing that may stop for a human review belongs there. These two never stop; the request
graph does only when the council splits (small requests are auto-approved), and its call lasts
until the allocation ends. Behind a server with tokens (graph/auth.py) a member or approver
sees only their project's allocations and releases only those.
"""

from __future__ import annotations

from typing import Any

from langgraph.config import get_config
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from typing_extensions import TypedDict

from fleet.errors import GPUAgentError
from fleet.models import ReleaseReason
from graph.auth import caller_of
from graph.status import fleet_status, scoped
from nodes.context import Context, services_for


class StatusInput(TypedDict, total=False):
    project: str  # only this project's allocations


class StatusState(StatusInput, total=False):
    fleet: dict[str, Any]


class ReleaseInput(TypedDict):
    allocation_id: str


class ReleaseState(ReleaseInput, total=False):
    release: dict[str, Any]
    error: str


def read_status(state: StatusState, runtime: Runtime[Context]) -> dict[str, Any]:
    fleet = fleet_status(services_for(runtime))
    who = caller_of(get_config())
    if who is not None and not who.admin:  # a token's project: its own allocations only
        return {"fleet": scoped(fleet, who.project or "")}
    project = state.get("project")
    if project:
        fleet["allocations"] = [a for a in fleet["allocations"] if a["project"] == project]
    return {"fleet": fleet}


def release_now(state: ReleaseState, runtime: Runtime[Context]) -> dict[str, Any]:
    svc = services_for(runtime)
    try:
        who = caller_of(get_config())
        if who is not None:
            who.check_project(svc.ledger.get(state["allocation_id"]).project,
                              "release allocations")
        release = svc.release(state["allocation_id"], ReleaseReason.EXPLICIT)
    except GPUAgentError as exc:
        return {"error": str(exc)}
    return {"release": release.model_dump(mode="json")}


def _one_step(state: type[Any], input_schema: type[Any], name: str,
              node: Any) -> CompiledStateGraph[Any, Context, Any, Any]:
    builder = StateGraph(state, context_schema=Context, input_schema=input_schema)
    builder.add_node(name.removeprefix("gpu-"), node)
    builder.add_edge(START, name.removeprefix("gpu-"))
    builder.add_edge(name.removeprefix("gpu-"), END)
    return builder.compile(name=name)


status_graph = _one_step(StatusState, StatusInput, "gpu-status", read_status)
release_graph = _one_step(ReleaseState, ReleaseInput, "gpu-release", release_now)

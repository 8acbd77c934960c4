"""The wiring: validate -> council -> [review] -> route -> allocate -> [wait] -> monitor* ->
deallocate, with the branches a user expects. Routers are Literal-typed so drawings show them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from fleet.faults import armed as faults_armed
from fleet.faults import fault
from fleet.models import Outcome, Status
from nodes.allocate import allocate
from nodes.context import Context
from nodes.council import council
from nodes.deallocate import deallocate
from nodes.monitor import monitor
from nodes.review import review
from nodes.route import route
from nodes.state import InputState, State
from nodes.validate import validate
from nodes.wait import wait

GRAPH_NAME = "gpu-agent"
RECURSION_LIMIT = 10_000_000  # the monitor loops one super-step per tick


def after_validate(state: State) -> Literal["council", "__end__"]:
    return "council" if state.get("status") == Status.PENDING else "__end__"


def after_council(state: State) -> Literal["route", "review", "__end__"]:
    if state.get("status") == Status.DENIED:
        return "__end__"
    return "review" if state["council"].outcome is Outcome.SPLIT else "route"


def after_review(state: State) -> Literal["route", "__end__"]:
    return "route" if state.get("status") == Status.PENDING else "__end__"


def after_route(state: State) -> Literal["allocate", "__end__"]:
    return "__end__" if state.get("status") == Status.DENIED else "allocate"


def after_allocate(state: State) -> Literal["monitor", "wait", "__end__"]:
    status = state.get("status")
    if status == Status.ALLOCATED:
        return "monitor"
    return "wait" if status == Status.QUEUED else "__end__"


def after_wait(state: State) -> Literal["allocate", "__end__"]:
    return "allocate" if state.get("status") == Status.QUEUED else "__end__"


def after_monitor(state: State) -> Literal["monitor", "deallocate"]:
    return "deallocate" if state.get("release_reason") else "monitor"


Node = Callable[..., dict[str, Any]]  # (state, runtime) -> partial update

NODES: dict[str, Node] = {
    "validate": validate,
    "council": council,
    "review": review,
    "route": route,
    "allocate": allocate,
    "wait": wait,
    "monitor": monitor,
    "deallocate": deallocate,
}
EDGES: dict[str, str] = {START: "validate", "deallocate": END}  # the unconditional edges
ROUTERS: dict[str, Callable[[State], str]] = {
    "validate": after_validate,
    "council": after_council,
    "review": after_review,
    "route": after_route,
    "allocate": after_allocate,
    "wait": after_wait,
    "monitor": after_monitor,
}


def _with_faults(name: str, fn: Node) -> Node:
    """The node with the fault points before:NAME and after:NAME around it (tests only)."""

    @functools.wraps(fn)
    def node(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
        fault(f"before:{name}")
        update = fn(state, runtime)
        fault(f"after:{name}")
        return update

    return node


def build_graph(
    checkpointer: BaseCheckpointSaver[str] | None = None,
    *,
    replace: Mapping[str, Node] | None = None,
) -> CompiledStateGraph[State, Context, InputState, State]:
    """The compiled graph. `replace` swaps node functions (benchmarks, fault-injection tests)."""
    builder = StateGraph(State, context_schema=Context, input_schema=InputState)
    for name, fn in NODES.items():
        node = (replace or {}).get(name, fn)
        builder.add_node(name, _with_faults(name, node) if faults_armed() else node)
    for source, target in EDGES.items():
        builder.add_edge(source, target)
    for name, router in ROUTERS.items():
        builder.add_conditional_edges(name, router)
    compiled = builder.compile(checkpointer=checkpointer, name=GRAPH_NAME)
    return compiled.with_config(recursion_limit=RECURSION_LIMIT)


# Checkpointer-free, for langgraph.json and the LangGraph server (which brings its own).
graph = build_graph()

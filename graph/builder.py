"""The compiled graph from the wiring (nodes.wiring, which the simulator reads too):
validate -> council -> [review] -> route -> allocate -> [wait] -> monitor* -> deallocate."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from fleet.faults import armed as faults_armed
from fleet.faults import fault
from nodes.context import Context
from nodes.state import InputState, State
from nodes.wiring import EDGES, NODES, ROUTERS, Node

GRAPH_NAME = "gpu-agent"
RECURSION_LIMIT = 10_000_000  # the monitor loops one super-step per tick


def _with_faults(name: str, fn: Node) -> Node:
    """The node with the fault points before:NAME and after:NAME around it (tests only)."""

    @functools.wraps(fn)
    def node(state: State, runtime: Runtime[Context]) -> State:
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

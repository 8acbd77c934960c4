"""The wiring: validate -> council -> [review] -> route -> allocate -> [wait] -> monitor* ->
deallocate, with the branches a user expects. Routers are Literal-typed so drawings show them."""

from __future__ import annotations

from typing import Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

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


def after_validate(state: State) -> Literal["council", "__end__"]:
    return "council" if state.get("status") is Status.PENDING else "__end__"


def after_council(state: State) -> Literal["route", "review", "__end__"]:
    if state.get("status") is Status.DENIED:
        return "__end__"
    return "review" if state["council"].outcome is Outcome.SPLIT else "route"


def after_review(state: State) -> Literal["route", "__end__"]:
    return "route" if state.get("status") is Status.PENDING else "__end__"


def after_route(state: State) -> Literal["allocate", "__end__"]:
    return "__end__" if state.get("status") is Status.DENIED else "allocate"


def after_allocate(state: State) -> Literal["monitor", "wait", "__end__"]:
    status = state.get("status")
    if status is Status.ALLOCATED:
        return "monitor"
    return "wait" if status is Status.QUEUED else "__end__"


def after_wait(state: State) -> Literal["allocate", "__end__"]:
    return "allocate" if state.get("status") is Status.QUEUED else "__end__"


def after_monitor(state: State) -> Literal["monitor", "deallocate"]:
    return "deallocate" if state.get("release_reason") else "monitor"


def build_graph(
    checkpointer: BaseCheckpointSaver[str] | None = None,
) -> CompiledStateGraph[State, Context, InputState, State]:
    builder = StateGraph(State, context_schema=Context, input_schema=InputState)
    builder.add_node("validate", validate)
    builder.add_node("council", council)
    builder.add_node("review", review)
    builder.add_node("route", route)
    builder.add_node("allocate", allocate)
    builder.add_node("wait", wait)
    builder.add_node("monitor", monitor)
    builder.add_node("deallocate", deallocate)
    builder.add_edge(START, "validate")
    builder.add_conditional_edges("validate", after_validate)
    builder.add_conditional_edges("council", after_council)
    builder.add_conditional_edges("review", after_review)
    builder.add_conditional_edges("route", after_route)
    builder.add_conditional_edges("allocate", after_allocate)
    builder.add_conditional_edges("wait", after_wait)
    builder.add_conditional_edges("monitor", after_monitor)
    builder.add_edge("deallocate", END)
    return builder.compile(checkpointer=checkpointer, name=GRAPH_NAME)


# Checkpointer-free, for langgraph.json and the LangGraph server (which brings its own).
graph = build_graph()

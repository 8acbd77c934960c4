"""The wiring: validate -> council -> [review] -> route -> allocate -> [wait] -> monitor* ->
deallocate, with the branches a user expects. Routers are Literal-typed so drawings show them.
The tables live here, not in graph/, so that the graph (graph.builder) and the simulator
(sim.engine) read the same ones without the simulator importing the graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from langgraph.graph import END, START

from fleet.models import CouncilOutcome, Status
from nodes.allocate import allocate
from nodes.council import council
from nodes.deallocate import deallocate
from nodes.monitor import monitor
from nodes.review import review
from nodes.route import route
from nodes.state import State
from nodes.validate import validate
from nodes.wait import wait


def after_validate(state: State) -> Literal["council", "__end__"]:
    return "council" if state.get("status") == Status.PENDING else "__end__"


def after_council(state: State) -> Literal["route", "review", "__end__"]:
    if state.get("status") == Status.DENIED:
        return "__end__"
    return "review" if state["council"].outcome is CouncilOutcome.SPLIT else "route"


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


Node = Callable[..., State]  # (state, runtime) -> partial update

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

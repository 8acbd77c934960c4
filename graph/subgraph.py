"""The gpu-agent graph as one step of a bigger graph, with its state mapped explicitly.

A compiled graph added directly as a node shares the parent's keys, and a list key with an
`operator.add` reducer (both have `events`) then comes back whole and is appended again
(langgraph#3648). So the parent calls the graph inside a node of its own and keeps only what it
names: the request goes in from `request_key`, one summary comes back in `result_key`. The
graph's checkpoints live under the parent's thread, and a human review interrupts the parent;
resuming the parent with `Command(resume=...)` resumes the review. The parent passes the
gpu-agent runtime context (an Orchestrator's `.context`) when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph

from fleet.models import Status
from graph.builder import build_graph

Node = Callable[[dict[str, Any], RunnableConfig], dict[str, Any]]


def summary(values: dict[str, Any]) -> dict[str, Any]:
    """What a parent keeps of a finished (or stopped) gpu-agent run: plain JSON."""
    allocation, release = values.get("allocation"), values.get("release")
    return {
        "status": Status(values["status"]).value,
        "reason": values.get("reason", ""),
        "thread_id": values.get("thread_id"),
        "allocation": None if allocation is None else allocation.model_dump(mode="json"),
        "release": None if release is None else release.model_dump(mode="json"),
        "cost_usd": values.get("cost_usd", 0.0),
    }


def gpu_request_node(
    request_key: str = "gpu_request",
    result_key: str = "gpu_result",
    graph: CompiledStateGraph[Any, Any, Any, Any] | None = None,
) -> Node:
    """A parent-graph node: runs the request at `state[request_key]` through gpu-agent and
    writes `summary(...)` to `result_key`; nothing else of the graph's state leaks out."""
    compiled = graph or build_graph()

    def get_gpus(state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        if request_key not in state:
            missing = {"status": Status.INVALID, "reason": f"the state has no {request_key!r}"}
            return {result_key: summary(missing)}
        values = compiled.invoke({"request": state[request_key]}, config)
        return {result_key: summary(values)}

    return get_gpus

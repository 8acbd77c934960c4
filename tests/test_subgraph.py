"""The gpu-agent graph as one step of a parent graph: explicit state mapping, one entry in the
parent's own `events` list per step (no duplicated list keys), and a human review that
interrupts the parent and resumes through it."""

from __future__ import annotations

import operator
from typing import Annotated, Any

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command
from typing_extensions import TypedDict

from graph.checkpoint import serializer
from graph.subgraph import gpu_request_node
from tests.conftest import OrchFactory, small_config


class Pipeline(TypedDict, total=False):
    gpu_request: dict[str, Any]
    gpu_result: dict[str, Any]
    events: Annotated[list[str], operator.add]  # the same name as the gpu-agent graph's list


def pipeline() -> Any:
    get_gpus: Any = gpu_request_node()  # a plain-dict node, as other graphs embed it

    def train(state: Pipeline) -> dict[str, Any]:
        allocation = state["gpu_result"]["allocation"]
        return {"events": [f"trained on {allocation['gpu_ids'] if allocation else 'nothing'}"]}

    def log(state: Pipeline) -> dict[str, Any]:
        return {"events": [f"gpu-agent: {state['gpu_result']['status']}"]}

    builder = StateGraph(Pipeline)
    builder.add_node("get_gpus", get_gpus)
    builder.add_node("log", log)
    builder.add_node("train", train)
    builder.add_edge(START, "get_gpus")
    builder.add_edge("get_gpus", "log")
    builder.add_edge("log", "train")
    builder.add_edge("train", END)
    return builder.compile(checkpointer=InMemorySaver(serde=serializer()))


ASK = {"project": "vision", "purpose": "training", "duration_hours": 1}


def test_the_graph_is_one_step_of_a_parent_graph(make_orch: OrchFactory) -> None:
    orch = make_orch()
    out = pipeline().invoke(
        {"gpu_request": ASK | {"count": 1}, "events": []},
        {"configurable": {"thread_id": "p1"}},
        context=orch.context,
    )
    result = out["gpu_result"]
    assert result["status"] == "released" and result["release"]["reason"] == "lease-expired"
    assert len(result["allocation"]["gpu_ids"]) == 1
    assert out["events"] == [
        "gpu-agent: released",
        f"trained on {result['allocation']['gpu_ids']}",
    ]  # not doubled
    assert set(out) == {"gpu_request", "gpu_result", "events"}  # nothing else leaked in
    assert [r.allocation_id for r in orch.history()] == [result["allocation"]["id"]]


def test_a_human_review_interrupts_the_parent_and_resumes_through_it(
    make_orch: OrchFactory,
) -> None:
    orch = make_orch(
        small_config(
            council={
                "policy": "reference",
                "approve_threshold": 0.99,
                "deny_threshold": 0.05,
                "auto_approve_max_gpus": 0,
            }
        )
    )
    parent, config = pipeline(), {"configurable": {"thread_id": "p2"}}
    stopped = parent.invoke(
        {"gpu_request": ASK | {"count": 2}, "events": []}, config, context=orch.context
    )
    (question,) = stopped["__interrupt__"]
    assert question.value["question"] == "approve 2 GPU(s) for vision?"
    assert orch.services.ledger.allocations() == []
    done = parent.invoke(
        Command(resume={"approve": True, "by": "lead"}), config, context=orch.context
    )
    assert done["gpu_result"]["status"] == "released"
    assert done["events"][0] == "gpu-agent: released" and len(done["events"]) == 2
    assert len(orch.history()) == 1

"""The LangChain tools inside a tool-calling agent (langchain's create_agent, a LangGraph graph)
driven by a scripted fake chat model (langchain-core's GenericFakeChatModel)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import ValidationError

from fleet import thread_claims
from fleet.access import add_identity
from fleet.models import Status
from graph.orchestrator import Orchestrator
from graph.tools import gpu_tools, keyed_thread
from nodes.state import InputState
from tests.conftest import ROOT, OrchFactory, small_config


class ScriptedModel(GenericFakeChatModel):
    """Answers with the scripted messages in order; tools are bound by the agent, not used."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self


def call(name: str, args: dict[str, Any], n: int) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[{"name": name, "args": args, "id": f"call-{n}", "type": "tool_call"}],
    )


def results(messages: list[Any]) -> dict[str, dict[str, Any]]:
    return {str(m.name): json.loads(m.text) for m in messages if isinstance(m, ToolMessage)}


def test_an_agent_requests_gpus_through_the_tool(make_orch: OrchFactory) -> None:
    orch = make_orch()
    tools = gpu_tools(orch)
    model = ScriptedModel(
        messages=iter(
            [
                call(
                    "request_gpus",
                    {"project": "vision", "count": 2, "hours": 3, "gpu_type": "A100"},
                    1,
                ),
                call("gpu_status", {}, 2),
                AIMessage(content="You have 2 A100s."),
            ]
        )
    )
    agent = create_agent(model, tools)
    out = agent.invoke({"messages": [HumanMessage("2 A100s for vision, 3 hours please")]})
    got = results(out["messages"])
    placed = got["request_gpus"]
    assert placed["status"] == "allocated" and len(placed["gpu_ids"]) == 2
    assert placed["cuda_visible_devices"] == ",".join(placed["gpu_ids"])
    assert set(got["gpu_status"]) == {"free_gpus_by_type", "allocations"}
    assert out["messages"][-1].content == "You have 2 A100s."
    for monitor in tools[0].metadata["monitors"]:  # type: ignore[index]
        monitor.join(30)
    (row,) = orch.services.ledger.allocations()
    assert row.id == placed["allocation_id"] and row.project == "vision" and row.count == 2
    assert orch.outcome(placed["thread_id"]).status is Status.RELEASED  # monitored to its end


def test_a_split_council_is_a_result_not_an_exception(make_orch: OrchFactory) -> None:
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
    tools = gpu_tools(orch)
    model = ScriptedModel(
        messages=iter(
            [
                call("request_gpus", {"project": "nlp", "count": 2, "hours": 1}, 1),
                call("release_gpus", {"allocation_id": "a-nope"}, 2),
                AIMessage(content="Waiting for a human."),
            ]
        )
    )
    out = create_agent(model, tools).invoke({"messages": [HumanMessage("2 GPUs for nlp")]})
    got = results(out["messages"])
    pending = got["request_gpus"]
    assert pending["status"] == "pending_human_approval"
    assert (
        pending["next_step"] == f"a human decides: gpu-agent resume {pending['thread_id']} "
        "--approve (or --deny)"
    )
    assert got["release_gpus"]["status"] == "invalid"  # a bad id is a result too
    assert orch.services.ledger.allocations() == []
    done = orch.resume(pending["thread_id"], {"approve": True, "by": "lead"})
    assert done.status is Status.RELEASED and done.allocation is not None


def test_bad_tool_arguments_are_refused_by_the_schema(make_orch: OrchFactory) -> None:
    orch = make_orch()
    request = gpu_tools(orch)[0]
    for bad in (
        {"project": "p", "hours": -1},
        {"project": "p", "hours": 1, "count": 0},
        {"project": "p", "hours": 1, "colour": "red"},
        {"project": "p", "hours": True},  # not read as 1
        {"project": "p", "hours": 1, "count": True},
        {"project": "p", "hours": "inf"},
        {"project": "p", "hours": 1, "budget_usd": "nan"},
    ):
        try:
            request.invoke(bad)
        except Exception as exc:  # pydantic's ValidationError, before anything runs
            assert "validation error" in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")
    assert request.invoke({"project": "bad name!", "hours": 1})["status"] == "invalid"
    assert orch.services.ledger.allocations() == []


def test_the_agent_example_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_tool.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert '"status": "allocated"' in done.stdout and "release_gpus -> explicit" in done.stdout


def test_a_retry_with_the_same_key_never_requests_twice(make_orch: OrchFactory) -> None:
    orch = make_orch()
    tools = gpu_tools(orch)
    request = tools[0]
    args = {"project": "vision", "count": 2, "hours": 1, "idempotency_key": "job-7"}
    first = request.invoke(args)
    assert first["status"] == "allocated"
    for monitor in tools[0].metadata["monitors"]:  # type: ignore[index]
        monitor.join(30)
    again = request.invoke(args)  # the framework retries: the first call's answer, ended now
    assert again["status"] == "released" and again["thread_id"] == first["thread_id"]
    assert again["allocation_id"] == first["allocation_id"]
    (row,) = orch.services.ledger.allocations()
    assert row.id == first["allocation_id"]
    other = request.invoke(args | {"count": 1})  # the same key for another request
    assert other["status"] == "invalid" and "already used for another request" in other["reason"]
    elsewhere = request.invoke(args | {"project": "nlp"})  # keys are per project
    assert elsewhere["status"] == "allocated" and elsewhere["thread_id"] != first["thread_id"]
    for monitor in tools[0].metadata["monitors"]:  # type: ignore[index]
        monitor.join(30)
    assert len(orch.services.ledger.allocations()) == 2


def test_a_retry_while_the_first_call_decides_places_nothing(make_orch: OrchFactory) -> None:
    orch = make_orch()
    request = gpu_tools(orch)[0]
    args = {"project": "vision", "count": 1, "hours": 1, "idempotency_key": "k"}
    thread = keyed_thread("vision", "k")
    # the first call (alive, this process) has claimed the name and is deciding
    owner = thread_claims.claim(orch.services.ledger, thread, "r-1", "python", lambda: False)
    busy = request.invoke(args)
    assert busy["status"] == "in_progress" and busy["thread_id"] == thread
    # ... and the same where it decides on another host (whose life cannot be seen here):
    # each call is its own request, so its claim is not taken over at once
    orch.services.ledger.give_thread_back(thread, owner)
    won, _ = orch.services.ledger.claim_thread(
        thread, "otherhost@1:4242:deadbeef:python", "r-2", time.time()
    )
    assert won
    assert request.invoke(args)["status"] == "in_progress"
    assert orch.services.ledger.allocations() == []


def first_call_stopped_before(orch: Orchestrator, node: str) -> str:
    """The thread of a first `request_gpus` call (project vision, key "k", one GPU for an
    hour), run through the graph until it stands before `node`, as if its process died."""
    thread = keyed_thread("vision", "k")
    req = orch.check({"project": "vision", "count": 1, "duration_hours": 1, "request_id": thread})
    orch.graph.invoke(
        InputState(request=req),
        {"configurable": {"thread_id": thread}},
        context=orch.context,
        interrupt_before=[node],
    )
    return thread


def test_a_retry_places_what_a_dead_first_call_decided(make_orch: OrchFactory) -> None:
    orch = make_orch()
    tools = gpu_tools(orch)
    args = {"project": "vision", "count": 1, "hours": 1, "idempotency_key": "k"}
    # the first call decided and its process died before allocate: the thread stands there
    thread = first_call_stopped_before(orch, "allocate")
    assert orch.outcome(thread).next == ("allocate",)
    placed = tools[0].invoke(args)
    assert placed["status"] == "allocated" and placed["thread_id"] == thread
    for monitor in tools[0].metadata["monitors"]:  # type: ignore[index]
        monitor.join(30)
    (row,) = orch.services.ledger.allocations()
    assert row.id == placed["allocation_id"] and row.state == "released"


class FlakyCouncil:
    """The council, failing its first decision (a model that timed out)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.calls = inner, inner.name, 0

    def decide(self, features: Any, settings: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise TimeoutError("the council's model timed out")
        return self.inner.decide(features, settings)


def test_a_retry_carries_on_a_first_call_that_failed_deciding(make_orch: OrchFactory) -> None:
    """The first call raised in the council and its thread stopped there: a retry with the
    same key carries it on from its checkpoint (it answered that checkpoint's 'pending')."""
    from council.policies import council_for

    council = FlakyCouncil(council_for(small_config().council))
    orch = make_orch(
        small_config(council={"auto_approve_max_gpus": 0, "auto_approve_max_usd": 0}),
        council=council,
    )
    request = gpu_tools(orch)[0]
    args = {"project": "vision", "count": 1, "hours": 1, "idempotency_key": "k1"}
    with pytest.raises(TimeoutError):
        request.invoke(args)
    assert orch.outcome(keyed_thread("vision", "k1")).next == ("council",)
    again = request.invoke(args)
    assert again["status"] == "allocated" and council.calls == 2
    assert len(orch.services.ledger.allocations()) == 1


def test_a_retry_finds_its_gpus_whatever_a_check_says_now(
    make_orch: OrchFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry looks its key up before checking the request again: a check that fails now
    (the backend unreachable for a moment) must not answer 'invalid' for GPUs placed."""
    orch = make_orch()
    request = gpu_tools(orch)[0]
    args = {"project": "vision", "count": 1, "hours": 1, "idempotency_key": "k"}
    first = request.invoke(args)
    assert first["status"] == "allocated"
    monkeypatch.setattr(orch.services.backend, "problem", "cannot reach it", raising=False)
    monkeypatch.setattr(orch.services, "inventory", [])
    again = request.invoke(args)
    assert again["allocation_id"] == first["allocation_id"] and again["status"] != "invalid"


def test_gpu_status_counts_gpus_other_projects_hold_as_held(
    make_orch: OrchFactory, tmp_path: Path
) -> None:
    """A member's status shows another project's GPUs without their allocation: they are
    held all the same, not free (a member asking for them would be queued)."""
    state = tmp_path / "state"
    state.mkdir()
    root = add_identity(state, "root", "admin", None)
    speech = make_orch(token=add_identity(state, "bob", "member", "speech"))
    held = speech.request({"count": 2, "duration_hours": 1, "purpose": "inference"}, wait=False)
    assert held.allocation is not None and held.allocation.gpu_type == "T4"  # both T4s
    vision = gpu_tools(make_orch(token=add_identity(state, "alice", "member", "vision")))[2]
    seen = vision.invoke({})
    assert "T4" not in seen["free_gpus_by_type"]
    assert (
        seen["free_gpus_by_type"]
        == gpu_tools(make_orch(token=root))[2].invoke({})["free_gpus_by_type"]
    )
    assert seen["allocations"] == []  # and speech's allocation stays its own


def test_a_retry_after_release_answers_released(make_orch: OrchFactory) -> None:
    """The ledger releases at once, the thread's checkpoint when its monitor next wakes: a
    retry in between answers what the ledger says, not the GPUs that are free again."""
    orch = make_orch()
    request, release, _ = gpu_tools(orch)
    args = {"project": "vision", "count": 1, "hours": 1, "idempotency_key": "k"}
    # placed, and its monitor not awake yet: the checkpoint says allocated
    thread = first_call_stopped_before(orch, "monitor")
    placed = orch.outcome(thread)
    assert placed.status is Status.ALLOCATED and placed.allocation is not None
    assert release.invoke({"allocation_id": placed.allocation.id})["status"] == "released"
    assert orch.outcome(thread).status is Status.ALLOCATED  # the checkpoint lags
    again = request.invoke(args)
    assert again["status"] == "released" and again["reason"] == "released: explicit"
    assert again["allocation_id"] == placed.allocation.id and "gpu_ids" not in again
    assert request.metadata is not None and request.metadata["monitors"] == []


def test_gpu_status_refuses_arguments(make_orch: OrchFactory) -> None:
    """gpu_status takes none: an extra key is refused as the other tools refuse one, not
    dropped (an agent passing a project must not read the answer as that project's)."""
    orch = make_orch()
    _, release, status = gpu_tools(orch)
    for bad in ({"project": "speech"}, {"bogus": "x\n"}, "speech"):
        with pytest.raises(ValidationError, match="validation error"):
            status.invoke(bad)
    with pytest.raises(ValidationError, match="validation error"):
        release.invoke({"allocation_id": "a-000000000000", "bogus": 1})
    assert set(status.invoke({})) == {"free_gpus_by_type", "allocations"}

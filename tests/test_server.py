"""The real LangGraph server (`langgraph dev`, langgraph-cli[inmem]) on loopback, driven by the
real clients: langgraph_sdk, RemoteGraph, MCP over HTTP, and the CLI on the same SQLite file or
the same PostgreSQL database.

The fleet sends requests of two GPUs or more to the (reference) council with thresholds that
always split, so they stop at the human review; one-GPU requests are auto-approved (what MCP,
which runs without a thread, can do). The clock runs 3,600 times fast, so a one-hour lease ends
in about a second.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from langgraph.pregel.remote import RemoteGraph
from langgraph.types import Command
from langgraph_sdk import get_client, get_sync_client
from langgraph_sdk.errors import BadRequestError

from graph.orchestrator import Orchestrator
from tests.conftest import ROOT, fleet_toml

REQUEST: dict[str, Any] = {
    "project": "vision",
    "purpose": "training",
    "count": 2,
    "duration_hours": 1,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        data: dict[str, Any] = json.loads(r.read())
        return data


@contextmanager
def serve(tmp: Path, env_extra: dict[str, str]) -> Iterator[dict[str, str]]:
    """`gpu-agent studio` (which execs `langgraph dev`) on a free loopback port."""
    fleet = tmp / "fleet.toml"
    fleet.write_text(
        fleet_toml(
            council={
                "policy": "reference",
                "approve_threshold": 0.99,
                "deny_threshold": 0.05,
                "auto_approve_max_gpus": 1,
            },
            clock={"time_scale": 3600},
        )
    )
    state = tmp / "state"
    # the project's langgraph.json, with paths made absolute so the server's scratch files
    # (.langgraph_api/) land in tmp, not in the repository
    config = json.loads((ROOT / "langgraph.json").read_text())
    config["dependencies"] = [str(ROOT)]
    config["graphs"] = {k: str(ROOT / v.removeprefix("./")) for k, v in config["graphs"].items()}
    for key in ("checkpointer", "auth"):
        config[key]["path"] = str(ROOT / config[key]["path"].removeprefix("./"))
    config["http"]["app"] = str(ROOT / config["http"]["app"].removeprefix("./"))
    (tmp / "langgraph.json").write_text(json.dumps(config))
    port = free_port()
    env = {
        **os.environ,
        "GPU_AGENT_HOME": str(state),
        "GPU_AGENT_FLEET": str(fleet),
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGSMITH_TRACING": "false",
        **env_extra,
    }
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graph.cli",
            "studio",
            "--port",
            str(port),
            "--config",
            str(tmp / "langgraph.json"),
        ],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if get(f"{url}/ok").get("ok"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "langgraph dev did not start in 90 s"
            time.sleep(0.5)
        yield {
            "url": url,
            "state": str(state),
            "fleet": str(fleet),
            "database": env_extra.get("GPU_AGENT_DATABASE", ""),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The server on SQLite files in the state directory, then on PostgreSQL (ledger and
    checkpoints both, through env GPU_AGENT_DATABASE)."""
    database = {}
    if request.param == "postgres":
        from tests.pgserver import create_database

        database = {"GPU_AGENT_DATABASE": create_database(request.getfixturevalue("pg_admin"))}
    with serve(tmp_path_factory.mktemp("server"), database) as running:
        yield running


def test_the_server_shows_the_graph_and_its_context_form(server: dict[str, str]) -> None:
    client = get_sync_client(url=server["url"])
    (assistant,) = client.assistants.search(graph_id="gpu-agent")
    schemas: Any = client.assistants.get_schemas(assistant["assistant_id"])
    context = schemas["context_schema"]["properties"]
    assert set(context) == {"state_dir", "fleet_file", "backend", "replay", "database"}
    assert all(field.get("description") for field in context.values())
    assert "request" in schemas["input_schema"]["properties"]


def test_sdk_review_interrupt_then_resume_allocates_and_releases(server: dict[str, str]) -> None:
    """... and the thread keeps its latest checkpoint, not one a step of its hour's ticks
    (the fleet's default `[checkpoints] keep = "latest"`)."""

    async def flow() -> tuple[Any, Any, Any, Any]:
        client = get_client(url=server["url"])
        thread = await client.threads.create()
        tid = thread["thread_id"]
        seen = [
            part.event
            async for part in client.runs.stream(
                tid, "gpu-agent", input={"request": REQUEST}, stream_mode="updates"
            )
        ]
        assert "updates" in seen
        state = await client.threads.get_state(tid)
        status = (await client.threads.get(tid))["status"]
        assert status == "interrupted"
        final = await client.runs.wait(
            tid,
            "gpu-agent",
            command={"resume": {"approve": True, "by": "ana", "comment": "deadline"}},
        )
        assert isinstance(final, dict)
        history = await client.threads.get_history(tid, limit=1000)
        return state, final, await client.threads.get_state(tid), history

    state, final, after, history = asyncio.run(flow())
    assert state["next"] == ["review"]
    (question,) = state["interrupts"]
    assert question["value"]["question"] == "approve 2 GPU(s) for vision?"
    assert final["status"] == "released"
    assert final["request"]["requested_by"] == "local"  # no access file: the local user
    assert final["allocation"]["count"] == 2 and len(final["allocation"]["gpu_ids"]) == 2
    assert final["release"]["reason"] == "lease-expired"
    assert "human_decision" in [e["kind"] for e in final["events"]]
    assert after["next"] == []
    assert len(history) == 1 and history[0]["values"]["status"] == "released"


def test_a_fork_from_a_pruned_checkpoint_is_refused(server: dict[str, str]) -> None:
    """The review's checkpoint is pruned once the thread ran: a fork from its id through
    the SDK fails with one line, reading it is a 400, and the thread stays released (the
    server would have run the graph from its start, leaving a head no run carries on)."""
    client = get_sync_client(url=server["url"])
    tid = client.threads.create()["thread_id"]
    client.runs.wait(tid, "gpu-agent", input={"request": REQUEST | {"project": "speech"}})
    review = client.threads.get_state(tid)["checkpoint"]["checkpoint_id"]
    client.runs.wait(tid, "gpu-agent", command={"resume": {"approve": True, "by": "ana"}})
    no: Any = {"resume": {"approve": False, "by": "bo"}}
    with pytest.raises(Exception, match=f"InvalidInput: .* has no checkpoint {review!r}"):
        client.runs.wait(tid, "gpu-agent", command=no, checkpoint_id=review)
    with pytest.raises(BadRequestError, match="has no checkpoint"):
        client.threads.get_state(tid, checkpoint_id=review)
    history: Any = client.threads.get_history(tid)
    assert [h["values"]["status"] for h in history] == ["released"]
    with Orchestrator(
        server["state"], server["fleet"], create=False, database=server["database"] or None
    ) as orch:
        assert orch.resume(tid).status.value == "released"
        assert [a.project for a in orch.services.ledger.allocations()].count("speech") == 1


def test_a_new_request_on_a_used_thread_is_refused(server: dict[str, str]) -> None:
    """A thread carries one request: a new one on a thread whose request ran is refused
    before its run (409, one line) and nothing changes; before, its input landed on the
    other's state, and its GPUs were placed and released at once, charged $0."""
    client = get_sync_client(url=server["url"])
    tid = client.threads.create()["thread_id"]
    one = REQUEST | {"project": "ops", "count": 1}  # one GPU: no review
    first: Any = client.runs.wait(tid, "gpu-agent", input={"request": one})
    assert first["status"] == "released"
    refused = status_of(409, lambda: client.runs.wait(tid, "gpu-agent", input={"request": one}))
    assert refused == (
        f"thread {tid} already carries a request (released): make a new thread for a new "
        "request (a thread waiting for a review is answered with a resume command)"
    )
    for shape in ({"other": 1}, {"request": "x"}, {"request": None}):  # any input at all
        carried = status_of(409, lambda s=shape: client.runs.wait(tid, "gpu-agent", input=s))
        assert carried == refused
    history: Any = client.threads.get_history(tid)
    assert [h["values"]["status"] for h in history] == ["released"]
    # a second input queued behind the first's run (the default multitask strategy), before
    # any checkpoint of the thread says it carries a request: the first's claim refuses it
    queued = client.threads.create()["thread_id"]
    review = REQUEST | {"project": "ops"}  # two GPUs: it stops for a review
    run = client.runs.create(queued, "gpu-agent", input={"request": review})
    again = status_of(409, lambda: client.runs.create(queued, "gpu-agent", input={"request": one}))
    assert "a thread carries one request: make a new thread" in again or "already carries" in again
    client.runs.join(queued, run["run_id"])
    assert client.threads.get_state(queued)["next"] == ["review"]  # the first's review stands
    with Orchestrator(
        server["state"], server["fleet"], create=False, database=server["database"] or None
    ) as orch:
        assert [a.project for a in orch.services.ledger.allocations()].count("ops") == 1


def test_remote_graph_behaves_like_the_local_graph(server: dict[str, str]) -> None:
    remote = RemoteGraph("gpu-agent", url=server["url"])
    tid = get_sync_client(url=server["url"]).threads.create()["thread_id"]
    config: Any = {"configurable": {"thread_id": tid}}
    stopped = remote.invoke({"request": REQUEST | {"project": "nlp"}}, config)
    assert stopped["status"] == "pending_review"
    assert remote.get_state(config).next == ("review",)
    done: Any = remote.invoke(Command(resume={"approve": False, "by": "ana"}), config)
    assert done["status"] == "denied" and done["reason"].startswith("denied by ana")


def test_a_thread_made_through_the_server_resumes_from_the_cli(server: dict[str, str]) -> None:
    client = get_sync_client(url=server["url"])
    tid = client.threads.create()["thread_id"]
    client.runs.wait(tid, "gpu-agent", input={"request": REQUEST | {"project": "audio"}})
    with Orchestrator(
        server["state"], server["fleet"], create=False, database=server["database"] or None
    ) as orch:
        assert orch.outcome(tid).next == ("review",)  # the server's checkpoint, read here
        out = orch.resume(tid, {"approve": True, "by": "cli"})
    assert out.status.value == "released"
    after: Any = client.threads.get_state(tid)
    assert after["values"]["status"] == "released"  # and back


def mcp(
    url: str, method: str, params: dict[str, Any] | None = None, token: str | None = None
) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{url}/mcp", data=json.dumps(body).encode(), method="POST", headers=headers
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        reply: dict[str, Any] = json.loads(r.read())
    return reply["result"]  # type: ignore[no-any-return]


def mcp_call(
    url: str, tool: str, arguments: dict[str, Any], token: str | None = None, **params: Any
) -> dict[str, Any]:
    """A tool call's result: the graph's final state, which the server renders as a repr."""
    result = mcp(url, "tools/call", {"name": tool, "arguments": arguments, **params}, token)
    assert not result.get("isError"), result
    state: dict[str, Any] = ast.literal_eval(result["content"][0]["text"])
    return state


def test_mcp_lists_the_graphs_and_runs_a_request_that_needs_no_review(
    server: dict[str, str],
) -> None:
    url = server["url"]
    assert mcp(
        url,
        "initialize",
        {
            "protocolVersion": "2025-03-26",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    )
    tools = {t["name"]: t for t in mcp(url, "tools/list")["tools"]}
    assert set(tools) == {"gpu-agent", "gpu-status", "gpu-release"}
    assert "request" in tools["gpu-agent"]["inputSchema"]["properties"]
    assert tools["gpu-release"]["inputSchema"]["required"] == ["allocation_id"]
    done = mcp_call(
        url,
        "gpu-agent",
        {"request": {"project": "solo", "purpose": "training", "count": 1, "duration_hours": 1}},
    )
    assert done["status"] == "released" and done["release"]["reason"] == "lease-expired"


def test_mcp_status_and_release_reach_a_run_in_progress(server: dict[str, str]) -> None:
    url, client = server["url"], get_sync_client(url=server["url"])
    tid = client.threads.create()["thread_id"]
    stopped = client.runs.wait(
        tid,
        "gpu-agent",
        input={
            "request": {  # $400: not auto-approved
                "project": "longrun",
                "purpose": "training",
                "count": 1,
                "duration_hours": 100,
            }
        },
    )
    assert isinstance(stopped, dict) and stopped["status"] == "pending_review"
    run = client.runs.create(tid, "gpu-agent", command={"resume": {"approve": True}})
    deadline = time.monotonic() + 60
    while True:
        fleet = mcp_call(url, "gpu-status", {"project": "longrun"})["fleet"]
        active = [a for a in fleet["allocations"] if a["state"] == "active"]
        if active:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    (allocation,) = active
    held = [g for g in fleet["gpus"] if g["allocation_id"] == allocation["id"]]
    assert len(held) == 1 and held[0]["project"] == "longrun"
    released = mcp_call(url, "gpu-release", {"allocation_id": allocation["id"]})
    assert released["release"]["reason"] == "explicit"
    final = client.runs.join(tid, run["run_id"])
    assert final["status"] == "released" and final["release"]["reason"] == "explicit"
    assert (
        mcp_call(url, "gpu-release", {"allocation_id": "a-00000000cafe"})["error"]
        == "no allocation 'a-00000000cafe'"
    )


def refused(call: Any) -> int:
    """The HTTP status a call was refused with."""
    import httpx

    with pytest.raises(httpx.HTTPStatusError) as exc:
        call()
    return exc.value.response.status_code


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server with an access file: an admin, two members of vision and speech, an approver
    of vision. `client(name)`: an SDK client with that name's token (None: no token)."""
    from fleet.access import add_identity

    tmp = tmp_path_factory.mktemp("secured")
    (tmp / "state").mkdir()
    tokens = {
        name: add_identity(tmp / "state", name, role, project)
        for name, role, project in [
            ("root", "admin", None),
            ("alice", "member", "vision"),
            ("dave", "approver", "vision"),
            ("bob", "member", "speech"),
        ]
    }
    with serve(tmp, {}) as running:

        def client(name: str | None) -> Any:
            headers = {"Authorization": f"Bearer {tokens[name]}"} if name else None
            return get_sync_client(url=running["url"], headers=headers)

        yield {**running, "tmp": tmp, "tokens": tokens, "client": client}


def test_tokens_scope_threads_runs_and_decisions(secured: dict[str, Any]) -> None:
    """Each project sees and runs only its own threads, a member cannot decide a review, and
    the decision is recorded as the caller's."""
    client = secured["client"]
    assert refused(lambda: client(None).threads.create()) == 401
    alice, bob, dave = client("alice"), client("bob"), client("dave")
    tid = alice.threads.create()["thread_id"]
    stopped = alice.runs.wait(tid, "gpu-agent", input={"request": REQUEST})
    assert isinstance(stopped, dict) and stopped["status"] == "pending_review"
    assert tid not in {t["thread_id"] for t in bob.threads.search()}
    assert refused(lambda: bob.threads.get_state(tid)) in (403, 404)
    mine = bob.threads.create()["thread_id"]
    assert (
        refused(
            lambda: bob.runs.wait(
                mine,
                "gpu-agent",  # vision's project
                input={"request": REQUEST},
            )
        )
        == 403
    )
    assert (
        refused(lambda: alice.runs.wait(tid, "gpu-agent", command={"resume": {"approve": True}}))
        == 403
    )  # a member
    done = dave.runs.wait(tid, "gpu-agent", command={"resume": {"approve": True, "by": "mallory"}})
    assert isinstance(done, dict) and done["status"] == "released"
    assert done["human"]["by"] == "dave"
    assert tid in {t["thread_id"] for t in client("root").threads.search()}
    aid = done["allocation"]["id"]  # the stateless admin graphs (MCP's tools)
    taken = bob.runs.wait(None, "gpu-release", input={"allocation_id": aid})
    assert taken["error"] == f"no allocation {aid!r}"  # another project's: as if none
    seen = bob.runs.wait(None, "gpu-status", input={"project": "vision"})
    assert seen["fleet"]["allocations"] == []
    seen = client("root").runs.wait(None, "gpu-status", input={"project": "vision"})
    assert [a["id"] for a in seen["fleet"]["allocations"]] == [aid]


def test_an_answer_that_is_no_decision_is_refused_before_the_run(
    secured: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed answer is refused in one line (422) before any run, so the review still
    waits for a good one (LangGraph would replay a bad one for good); "approve" as a string
    is recorded as the caller's, as true and {...} are. A member may not take another
    project's thread with if_exists (their own comes back), and nobody rolls a run back (its
    thread would lose the GPUs it placed). A stateless run's review, whose thread is gone, is
    listed nowhere."""
    client = secured["client"]
    alice, bob, dave, root = (client(n) for n in ("alice", "bob", "dave", "root"))
    tid = alice.threads.create()["thread_id"]
    assert alice.runs.wait(tid, "gpu-agent", input={"request": REQUEST})["status"] == (
        "pending_review"
    )
    bad = status_of(422, lambda: dave.runs.wait(tid, "gpu-agent", command={"resume": "sure"}))
    assert bad.startswith("a review decision must be true/false")
    run = dave.runs.create(tid, "gpu-agent", command={"resume": "approve"})
    done = dave.runs.join(tid, run["run_id"])
    assert done["status"] == "released" and done["human"]["by"] == "dave"
    taken = status_of(409, lambda: bob.threads.create(thread_id=tid, if_exists="do_nothing"))
    assert taken == f"Thread with ID {tid} already exists"  # not handed to another project
    again = alice.threads.create(thread_id=tid, if_exists="do_nothing")
    assert again["thread_id"] == tid and again["metadata"]["project"] == "vision"
    back = status_of(403, lambda: root.runs.cancel(tid, run["run_id"], action="rollback"))
    assert back.startswith("a run is not rolled back here")
    rolled = status_of(
        403, lambda: alice.runs.create(tid, "gpu-agent", input={}, multitask_strategy="rollback")
    )
    assert rolled == back
    gone = alice.runs.wait(None, "gpu-agent", input={"request": REQUEST | {"duration_hours": 2}})
    assert gone["status"] == "pending_review"
    live = alice.threads.create()["thread_id"]
    alice.runs.wait(live, "gpu-agent", input={"request": REQUEST | {"duration_hours": 3}})
    monkeypatch.setenv("GPU_AGENT_TOKEN", secured["tokens"]["root"])
    with Orchestrator(
        secured["state"], secured["fleet"], create=False, database=secured["database"] or None
    ) as orch:
        waiting = [t for t, _ in orch.pending_review_entries()]  # the stateless one is gone
        assert live in waiting and all(orch.outcome(t).next == ("review",) for t in waiting)


def test_a_thread_holding_gpus_is_not_deleted(secured: dict[str, Any]) -> None:
    """Deleting a thread whose allocation is active is refused (409, one line), an admin's
    delete too, and another project's member is told only that there is no such thread; once
    the allocation is released the thread may go."""
    client = secured["client"]
    alice, bob, dave, root = (client(n) for n in ("alice", "bob", "dave", "root"))
    tid = alice.threads.create()["thread_id"]
    long = REQUEST | {"duration_hours": 100}  # 100 s at the fleet's 3,600 x clock
    assert alice.runs.wait(tid, "gpu-agent", input={"request": long})["status"] == (
        "pending_review"
    )
    run = dave.runs.create(tid, "gpu-agent", command={"resume": {"approve": True}})
    deadline = time.monotonic() + 60
    while True:
        seen = alice.runs.wait(None, "gpu-status", input={"project": "vision"})["fleet"]
        active = [a["id"] for a in seen["allocations"] if a["state"] == "active"]
        if active:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.5)
    (aid,) = active
    held = status_of(409, lambda: alice.threads.delete(tid))
    assert held.startswith(f"thread {tid} holds allocation {aid}: release it first")
    again = lambda: alice.runs.wait(tid, "gpu-agent", input={"request": REQUEST})  # noqa: E731
    assert status_of(409, again).startswith(f"thread {tid} already carries a request (allocated)")
    assert status_of(409, lambda: root.threads.delete(tid)) == held
    assert status_of(409, lambda: alice.threads.prune([tid])) == held  # nor pruned
    assert refused(lambda: bob.threads.delete(tid)) == 404
    assert (
        alice.runs.wait(None, "gpu-release", input={"allocation_id": aid})["release"]["reason"]
        == "explicit"
    )
    assert dave.runs.join(tid, run["run_id"])["status"] == "released"
    alice.threads.delete(tid)
    assert refused(lambda: alice.threads.get(tid)) == 404


def test_a_run_may_not_stop_once_it_placed_gpus(secured: dict[str, Any]) -> None:
    """A run's interrupt_before/interrupt_after naming a node at or after placement (or "*")
    is refused (422, one line), an admin's too: the run ended with its GPUs placed and
    nothing monitoring them past their lease (allocate, too: it runs again after each wait,
    a queued request then left with no one to place it). A stop before placement is fine.
    A run's recursion_limit is the graph's own, whatever was sent: a low one stopped the
    monitor."""
    client = secured["client"]
    alice, root = client("alice"), client("root")
    one = REQUEST | {"count": 1, "duration_hours": 0.02}  # auto-approved, 20 ms
    tid = alice.threads.create()["thread_id"]
    stops: list[dict[str, Any]] = [
        {"interrupt_before": ["monitor"]},
        {"interrupt_after": ["allocate"]},
        {"interrupt_before": ["deallocate"]},
        {"interrupt_before": ["route", "allocate"]},
        {"interrupt_after": "*"},
    ]
    for who in (alice, root):
        for stop in stops:
            detail = status_of(
                422,
                lambda w=who, s=stop: w.runs.wait(tid, "gpu-agent", input={"request": one}, **s),
            )
            assert detail.startswith("a run may not stop at ")
    assert alice.threads.get_state(tid)["values"] == {}  # nothing ran
    stopped = alice.runs.wait(tid, "gpu-agent", input={"request": one}, interrupt_after=["route"])
    assert stopped["status"] == "pending" and alice.threads.get_state(tid)["next"] == ["allocate"]
    assert alice.runs.wait(tid, "gpu-agent", input=None)["status"] == "released"
    hour = REQUEST | {"count": 1}  # 60 ticks of its monitor
    low = alice.runs.wait(None, "gpu-agent", input={"request": hour}, config={"recursion_limit": 5})
    assert low["status"] == "released" and low["release"]["reason"] == "lease-expired"


def test_a_run_the_server_would_fail_is_refused_before_it_claims_its_thread(
    secured: dict[str, Any],
) -> None:
    """Refused in one line before the run, so that a good request then starts the thread: an
    input that is no JSON object (it failed inside LangGraph, leaving the thread in error and
    claimed), a resume command on a thread waiting for no review (a TypeError, the thread
    claimed for good), a thread that does not exist or is another project's (the server's
    404 came after the claim). The tools run without a thread: run on one, they took it
    over (its graph_id), hiding the review it waits for. A review answered on a copy of the
    thread is not answered again on the original."""
    client = secured["client"]
    alice, bob, dave = client("alice"), client("bob"), client("dave")
    log = secured["tmp"] / "server.log"
    tracebacks = log.read_text().count("Traceback")
    one = REQUEST | {"count": 1, "duration_hours": 0.02}  # auto-approved, 20 ms
    run = lambda c, t, r: c.runs.wait(t, "gpu-agent", input={"request": r})  # noqa: E731
    for shape in ("x", 5, [1]):
        tid = alice.threads.create()["thread_id"]
        detail = status_of(422, lambda t=tid, s=shape: alice.runs.wait(t, "gpu-agent", input=s))
        assert detail == "the input must be a JSON object: {'request': {...}} for gpu-agent"
    assert run(alice, tid, one)["status"] == "released"
    tid = alice.threads.create()["thread_id"]
    none = f"thread {tid} is not waiting for a review"
    resume = lambda **k: dave.runs.wait(tid, "gpu-agent", command={"resume": True}, **k)  # noqa: E731
    assert status_of(422, resume) == none  # never run
    assert status_of(422, lambda: resume(input={"request": one})) == none
    assert run(alice, tid, one)["status"] == "released"
    assert status_of(422, resume) == none
    new, theirs = str(uuid.uuid4()), alice.threads.create()["thread_id"]
    status_of(404, lambda: run(alice, new, one))
    status_of(404, lambda: run(bob, theirs, REQUEST | {"project": "speech"}))
    alice.threads.create(thread_id=new)
    assert run(alice, new, one)["status"] == "released"
    assert run(alice, theirs, REQUEST)["status"] == "pending_review"
    for tool, tool_input in [("gpu-status", None), ("gpu-release", {"allocation_id": "a-0"})]:
        detail = status_of(422, lambda g=tool, i=tool_input: alice.runs.wait(theirs, g, input=i))
        assert detail == f"{tool} is a tool: run it without a thread (thread_id None), as MCP does"
    assert theirs in {t["thread_id"] for t in dave.threads.search(status="interrupted", limit=100)}
    # a copy of the thread carries its request: answered there, the original's answer is
    # refused (it was applied, placing GPUs the audit log said were denied)
    copy = alice.threads.copy(theirs)["thread_id"]
    no = dave.runs.wait(copy, "gpu-agent", command={"resume": {"approve": False}})
    assert no["status"] == "denied"
    yes = lambda: dave.runs.wait(theirs, "gpu-agent", command={"resume": True})  # noqa: E731
    assert status_of(409, yes) == "this review was already decided: deny by dave; nothing changed"
    # the decision itself again carries the thread on (as after a run that died once it had
    # recorded it)
    again = dave.runs.wait(theirs, "gpu-agent", command={"resume": {"approve": False}})
    assert again["status"] == "denied"
    assert log.read_text().count("Traceback") == tracebacks


def test_answers_are_read_as_the_review_reads_them_and_are_the_caller_s() -> None:
    """The auth's check of a resume command, in any form LangGraph takes: each answer parsed
    (with tokens stamped with the caller's name), one that is no decision refused with 422;
    a map of interrupt ids to answers answer by answer."""
    from langgraph_sdk import Auth

    from fleet.access import LOCAL, Identity, role_of
    from graph.auth import _answers

    dave = Identity("dave", "vision", role_of("approver"))
    iid = "10ced3568f730a9c2db379f99b39992b"
    mine = {"approve": True, "by": "dave", "comment": "", "guardrails": True}
    assert _answers(" Approve ", dave) == mine
    assert _answers({"approve": True, "by": "mallory"}, dave) == mine
    assert _answers({iid: True}, dave) == {iid: mine}
    assert _answers({"approve": False, "by": "ann"}, LOCAL)["by"] == "ann"  # no tokens
    for bad in ("sure", {"approve": "yes"}, {iid: "sure"}, None):
        with pytest.raises(Auth.exceptions.HTTPException) as exc:
            _answers(bad, dave)
        assert exc.value.status_code == 422


def status_of(code: int, call: Any) -> str:
    """The one-line `detail` of a call refused with HTTP `code`."""
    import httpx

    with pytest.raises(httpx.HTTPStatusError) as exc:
        call()
    assert exc.value.response.status_code == code, exc.value.response.text
    detail = str(exc.value.response.json()["detail"])
    assert "\n" not in detail and "Traceback" not in detail
    return detail


def test_the_context_is_the_servers_own(secured: dict[str, Any]) -> None:
    """A caller may not choose the fleet file, state directory, backend, recording or database:
    a run that names others is refused (403) before it starts, an admin's too; the server's own
    values, echoed, are fine. Who asked is the caller, whatever the request says."""
    tmp, client = secured["tmp"], secured["client"]
    other = tmp / "other.toml"  # auto-approves anything: no human review
    other.write_text(
        fleet_toml(
            council={
                "policy": "reference",
                "auto_approve_max_gpus": 64,
                "auto_approve_max_usd": 1e9,
            }
        )
    )
    elsewhere = tmp / "elsewhere"
    alice, root = client("alice"), client("root")
    big = REQUEST | {"gpu_type": "H100", "requested_by": "mallory"}
    allocations = len(root.runs.wait(None, "gpu-status", input={})["fleet"]["allocations"])
    tid = alice.threads.create()["thread_id"]
    choices: list[dict[str, Any]] = [
        {"fleet_file": str(other)},
        {"state_dir": str(elsewhere)},
        {"state_dir": str(elsewhere), "fleet_file": str(other)},
        {"backend": "nvml"},
        {"backend": "replay", "replay": str(tmp / "rec.jsonl")},
        {"replay": str(tmp / "rec.jsonl")},
        {"database": "postgresql://evil/db"},
    ]
    for context in choices:
        for who in (alice, root):
            detail = status_of(
                403,
                lambda w=who, c=context: w.runs.wait(
                    tid, "gpu-agent", input={"request": big}, context=c
                ),
            )
            assert detail.startswith("a run may not choose its " + next(iter(context)))
            status_of(
                403,
                lambda w=who, c=context: w.runs.wait(  # a stateless run
                    None, "gpu-agent", input={"request": big}, context=c
                ),
            )
    status_of(
        403,
        lambda: alice.runs.wait(  # the keys langgraph also reads from configurable
            tid,
            "gpu-agent",
            input={"request": big},
            config={"configurable": {"fleet_file": str(other)}},
        ),
    )
    status_of(
        403,
        lambda: alice.runs.wait(
            None, "gpu-status", input={}, context={"state_dir": str(elsewhere)}
        ),
    )
    status_of(
        403,
        lambda: root.assistants.create(  # an assistant's context is bound too
            "gpu-agent", context={"fleet_file": str(other)}
        ),
    )
    assert not elsewhere.exists()
    assert alice.threads.get_state(tid)["values"] == {}  # nothing ran on the thread
    after = root.runs.wait(None, "gpu-status", input={})["fleet"]["allocations"]
    assert len(after) == allocations  # nothing placed anywhere

    own = {
        "state_dir": secured["state"],
        "fleet_file": secured["fleet"],
        "backend": "simulated",
        "replay": None,
        "database": None,
    }
    stopped = alice.runs.wait(tid, "gpu-agent", input={"request": big}, context=own)
    assert isinstance(stopped, dict) and stopped["status"] == "pending_review"  # the review
    assert stopped["request"]["requested_by"] == "alice"
    local = str(Path(secured["state"]).relative_to(tmp))  # relative to the server's cwd
    plain = root.runs.wait(
        None,
        "gpu-agent",
        context={"state_dir": local},
        input={"request": REQUEST | {"count": 1, "project": "solo"}},
    )
    assert plain["status"] == "released" and plain["request"]["requested_by"] == "root"

    # only admins write a thread's state or steer a run: either could skip the review
    detail = status_of(
        403, lambda: alice.threads.update_state(tid, {"status": "pending"}, as_node="review")
    )
    assert detail == "alice may not write a thread's state: only an admin may"
    status_of(
        403,
        lambda: client("dave").runs.wait(
            tid, "gpu-agent", command={"goto": "route", "update": {"status": "pending"}}
        ),
    )
    status_of(403, lambda: alice.threads.update(tid, metadata={"project": "speech"}))
    assert alice.threads.get_state(tid)["next"] == ["review"]
    # caller-chosen thread ids: names.THREAD_ID (the server also wants a UUID)
    status_of(422, lambda: alice.threads.create(thread_id="../x\n"))
    assert refused(lambda: alice.threads.create(thread_id="a" * 200)) in (400, 422)
    detail = status_of(
        422,
        lambda: alice.runs.wait(
            None, "gpu-agent", input={"request": REQUEST | {"project": "vision\nx"}}
        ),
    )
    assert detail.startswith("project 'vision\\nx': ")


def test_refusals_over_mcp_are_one_line_results(secured: dict[str, Any]) -> None:
    """MCP's tool calls refused for a member: another project's request, another project's or
    no allocation, malformed ids and names, a context not the server's: one line each, as the
    tool's result, and no traceback in the server's log."""
    url, tokens, client = secured["url"], secured["tokens"], secured["client"]
    alice, bob = tokens["alice"], tokens["bob"]
    one = {"project": "vision", "purpose": "training", "count": 1, "duration_hours": 1}
    done = mcp_call(url, "gpu-agent", {"request": one | {"requested_by": "eve"}}, alice)
    assert done["status"] == "released" and done["request"]["requested_by"] == "alice"
    aid = done["allocation"]["id"]

    denied = mcp_call(url, "gpu-agent", {"request": one | {"project": "speech"}}, alice)
    assert denied["status"] == "denied"
    assert denied["reason"] == "alice may not request GPUs for project speech"
    assert "allocation" not in denied
    bad = mcp_call(url, "gpu-agent", {"request": one | {"project": "speech\nx"}}, alice)
    assert bad["status"] == "invalid" and "\n" not in bad["reason"]
    assert "project 'speech\\nx'" in bad["reason"]
    assert (
        mcp_call(url, "gpu-release", {"allocation_id": aid}, bob)["error"]
        == f"no allocation {aid!r}"
    )  # vision's, for a member of speech: as if none
    assert (
        mcp_call(url, "gpu-release", {"allocation_id": "a-00000000cafe"}, bob)["error"]
        == "no allocation 'a-00000000cafe'"
    )
    for wrong in ("a-nope", "../a-00000000cafe", "a-00000000cafe\n", "A-00000000CAFE", ""):
        error = mcp_call(url, "gpu-release", {"allocation_id": wrong}, bob)["error"]
        assert error.startswith("allocation id ") and "\n" not in error
    error = mcp_call(url, "gpu-status", {"project": "vision\nx"}, bob)["error"]
    assert error.startswith("project 'vision\\nx'")
    elsewhere = secured["tmp"] / "mcp-elsewhere"
    for tool, arguments in [
        ("gpu-agent", {"request": one}),
        ("gpu-status", {}),
        ("gpu-release", {"allocation_id": aid}),
    ]:
        state = mcp_call(url, tool, arguments, alice, context={"state_dir": str(elsewhere)})
        reason = state.get("reason") or state.get("error")
        assert reason is not None and reason.startswith("a run may not choose its state_dir")
    assert not elsewhere.exists()
    released = client("root").runs.wait(None, "gpu-status", input={"project": "vision"})
    assert [a["reason"] for a in released["fleet"]["allocations"] if a["id"] == aid] == [
        "lease-expired"
    ]  # bob's release did not touch it
    log = (secured["tmp"] / "server.log").read_text()
    assert "Traceback" not in log and " 500 " not in log


def test_the_page_is_mounted_on_the_server(server: dict[str, str]) -> None:
    """langgraph.json `http.app`: the web page under /ui beside the graph API."""
    client = get_sync_client(url=server["url"])
    tid = client.threads.create()["thread_id"]
    client.runs.wait(tid, "gpu-agent", input={"request": REQUEST | {"project": "webpage"}})
    with urllib.request.urlopen(f"{server['url']}/ui/reviews", timeout=30) as r:
        page = r.read().decode()
    assert "Pending reviews" in page and tid in page
    with urllib.request.urlopen(f"{server['url']}/ui/reviews/{tid}", timeout=30) as r:
        assert "If approved" in r.read().decode()

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from langgraph.pregel.remote import RemoteGraph
from langgraph.types import Command
from langgraph_sdk import get_client, get_sync_client

from graph.orchestrator import Orchestrator
from tests.conftest import ROOT, fleet_toml

REQUEST = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 1}


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
    fleet.write_text(fleet_toml(
        council={"policy": "reference", "approve_threshold": 0.99, "deny_threshold": 0.05,
                 "auto_approve_max_gpus": 1},
        clock={"time_scale": 3600}))
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
    env = {**os.environ, "GPU_AGENT_HOME": str(state), "GPU_AGENT_FLEET": str(fleet),
           "LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGSMITH_TRACING": "false", **env_extra}
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "graph.cli", "studio", "--port", str(port),
         "--config", str(tmp / "langgraph.json")],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
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
        yield {"url": url, "state": str(state), "fleet": str(fleet),
               "database": env_extra.get("GPU_AGENT_DATABASE", "")}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
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
    schemas = client.assistants.get_schemas(assistant["assistant_id"])
    context = schemas["context_schema"]["properties"]
    assert set(context) == {"state_dir", "fleet_file", "backend", "replay", "database"}
    assert all(field.get("description") for field in context.values())
    assert "request" in schemas["input_schema"]["properties"]


def test_sdk_review_interrupt_then_resume_allocates_and_releases(server: dict[str, str]) -> None:
    async def flow() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        client = get_client(url=server["url"])
        thread = await client.threads.create()
        tid = thread["thread_id"]
        seen = [part.event async for part in client.runs.stream(
            tid, "gpu-agent", input={"request": REQUEST}, stream_mode="updates")]
        assert "updates" in seen
        state = await client.threads.get_state(tid)
        status = (await client.threads.get(tid))["status"]
        assert status == "interrupted"
        final = await client.runs.wait(
            tid, "gpu-agent", command={"resume": {"approve": True, "by": "ana",
                                                   "comment": "deadline"}})
        assert isinstance(final, dict)
        return state, final, await client.threads.get_state(tid)

    state, final, after = asyncio.run(flow())
    assert state["next"] == ["review"]
    (question,) = state["interrupts"]
    assert question["value"]["question"] == "approve 2 GPU(s) for vision?"
    assert final["status"] == "released"
    assert final["allocation"]["count"] == 2 and len(final["allocation"]["gpu_ids"]) == 2
    assert final["release"]["reason"] == "lease-expired"
    assert "human_decision" in [e["kind"] for e in final["events"]]
    assert after["next"] == []


def test_remote_graph_behaves_like_the_local_graph(server: dict[str, str]) -> None:
    remote = RemoteGraph("gpu-agent", url=server["url"])
    tid = get_sync_client(url=server["url"]).threads.create()["thread_id"]
    config: Any = {"configurable": {"thread_id": tid}}
    stopped = remote.invoke({"request": REQUEST | {"project": "nlp"}}, config)
    assert stopped["status"] == "pending_review"
    assert remote.get_state(config).next == ("review",)
    done = remote.invoke(Command(resume={"approve": False, "by": "ana"}), config)
    assert done["status"] == "denied" and done["reason"].startswith("denied by ana")


def test_a_thread_made_through_the_server_resumes_from_the_cli(server: dict[str, str]) -> None:
    client = get_sync_client(url=server["url"])
    tid = client.threads.create()["thread_id"]
    client.runs.wait(tid, "gpu-agent", input={"request": REQUEST | {"project": "audio"}})
    with Orchestrator(server["state"], server["fleet"], create=False,
                      database=server["database"] or None) as orch:
        assert orch.outcome(tid).next == ("review",)  # the server's checkpoint, read here
        out = orch.resume(tid, {"approve": True, "by": "cli"})
    assert out.status.value == "released"
    assert client.threads.get_state(tid)["values"]["status"] == "released"  # and back


def mcp(url: str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
    request = urllib.request.Request(
        f"{url}/mcp", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "Accept": "application/json, text/event-stream"})
    with urllib.request.urlopen(request, timeout=60) as r:
        reply: dict[str, Any] = json.loads(r.read())
    return reply["result"]  # type: ignore[no-any-return]


def mcp_call(url: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A tool call's result: the graph's final state, which the server renders as a repr."""
    text = mcp(url, "tools/call", {"name": tool, "arguments": arguments})["content"][0]["text"]
    state: dict[str, Any] = ast.literal_eval(text)
    return state


def test_mcp_lists_the_graphs_and_runs_a_request_that_needs_no_review(
        server: dict[str, str]) -> None:
    url = server["url"]
    assert mcp(url, "initialize", {"protocolVersion": "2025-03-26", "capabilities": {},
                                   "clientInfo": {"name": "test", "version": "1"}})
    tools = {t["name"]: t for t in mcp(url, "tools/list")["tools"]}
    assert set(tools) == {"gpu-agent", "gpu-status", "gpu-release"}
    assert "request" in tools["gpu-agent"]["inputSchema"]["properties"]
    assert tools["gpu-release"]["inputSchema"]["required"] == ["allocation_id"]
    done = mcp_call(url, "gpu-agent", {"request": {
        "project": "solo", "purpose": "training", "count": 1, "duration_hours": 1}})
    assert done["status"] == "released" and done["release"]["reason"] == "lease-expired"


def test_mcp_status_and_release_reach_a_run_in_progress(server: dict[str, str]) -> None:
    url, client = server["url"], get_sync_client(url=server["url"])
    tid = client.threads.create()["thread_id"]
    stopped = client.runs.wait(tid, "gpu-agent", input={"request": {  # $400: not auto-approved
        "project": "longrun", "purpose": "training", "count": 1, "duration_hours": 100}})
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
    assert mcp_call(url, "gpu-release", {"allocation_id": "a-nope"})["error"].startswith(
        "no allocation")


def refused(call: Any) -> int:
    """The HTTP status a call was refused with."""
    import httpx

    with pytest.raises(httpx.HTTPStatusError) as exc:
        call()
    return exc.value.response.status_code


def test_tokens_scope_threads_runs_and_decisions(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The server with an access file: each project sees and runs only its own threads, a
    member cannot decide a review, and the decision is recorded as the caller's."""
    from fleet.access import add_identity

    tmp = tmp_path_factory.mktemp("secured")
    (tmp / "state").mkdir()
    tokens = {name: add_identity(tmp / "state", name, role, project) for name, role, project
              in [("root", "admin", None), ("alice", "member", "vision"),
                  ("dave", "approver", "vision"), ("bob", "member", "speech")]}
    with serve(tmp, {}) as running:
        def client(name: str | None) -> Any:
            headers = {"Authorization": f"Bearer {tokens[name]}"} if name else None
            return get_sync_client(url=running["url"], headers=headers)

        assert refused(lambda: client(None).threads.create()) == 401
        alice, bob, dave = client("alice"), client("bob"), client("dave")
        tid = alice.threads.create()["thread_id"]
        stopped = alice.runs.wait(tid, "gpu-agent", input={"request": REQUEST})
        assert isinstance(stopped, dict) and stopped["status"] == "pending_review"
        assert tid not in {t["thread_id"] for t in bob.threads.search()}
        assert refused(lambda: bob.threads.get_state(tid)) in (403, 404)
        mine = bob.threads.create()["thread_id"]
        assert refused(lambda: bob.runs.wait(mine, "gpu-agent",  # vision's project
                                             input={"request": REQUEST})) == 403
        assert refused(lambda: alice.runs.wait(tid, "gpu-agent", command={
            "resume": {"approve": True}})) == 403  # a member
        done = dave.runs.wait(tid, "gpu-agent", command={"resume": {"approve": True,
                                                                     "by": "mallory"}})
        assert isinstance(done, dict) and done["status"] == "released"
        assert done["human"]["by"] == "dave"
        assert tid in {t["thread_id"] for t in client("root").threads.search()}
        aid = done["allocation"]["id"]  # the stateless admin graphs (MCP's tools)
        taken = bob.runs.wait(None, "gpu-release", input={"allocation_id": aid})
        assert "may not release allocations of project vision" in taken["error"]
        seen = bob.runs.wait(None, "gpu-status", input={"project": "vision"})
        assert seen["fleet"]["allocations"] == []
        seen = client("root").runs.wait(None, "gpu-status", input={"project": "vision"})
        assert [a["id"] for a in seen["fleet"]["allocations"]] == [aid]


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

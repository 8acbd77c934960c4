"""The module-level graph (for langgraph.json) runs with a plain JSON context, no injection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver

from fleet.models import ReleaseReason, Status
from graph.builder import build_graph, graph
from nodes.context import Context, own_services
from tests.conftest import ROOT, fleet_toml


def test_exported_graph_has_no_checkpointer() -> None:
    assert graph.checkpointer is None
    assert set(graph.get_graph().nodes) >= {
        "validate",
        "council",
        "review",
        "route",
        "allocate",
        "wait",
        "monitor",
        "deallocate",
    }


def test_context_fields_resolve_to_services(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON context resolves to this process's own configuration (its environment), as on
    the LangGraph server; a context naming another state directory is refused (test_server)."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(clock={"time_scale": 360_000}))  # an hour in 10 ms
    monkeypatch.setenv("GPU_AGENT_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("GPU_AGENT_FLEET", str(fleet))
    context = Context()
    request: dict[str, Any] = {
        "project": "p",
        "purpose": "training",
        "count": 2,
        "duration_hours": 1,
        "gpu_type": "A100",
    }
    out = graph.invoke({"request": request}, context=context)
    assert out["status"] is Status.RELEASED
    assert out["release"].reason is ReleaseReason.LEASE_EXPIRED
    with_memory = build_graph(InMemorySaver())
    config: RunnableConfig = {"configurable": {"thread_id": "t"}}
    bad = with_memory.invoke({"request": request | {"count": "lots"}}, config, context=context)
    assert bad["status"] is Status.INVALID and "count" in bad["reason"]
    once: RunnableConfig = {"configurable": {"thread_id": "once"}}
    first = with_memory.invoke({"request": request}, once, context=context)
    assert first["status"] is Status.RELEASED
    # a second request on the thread would take the first one's allocation for its own
    again = with_memory.invoke({"request": request}, once, context=context)
    assert again["status"] is Status.INVALID
    assert again["reason"] == (
        f"thread 'once' already carried a request (released, allocation "
        f"{first['allocation_id']}): make a new thread for a new request"
    )
    allocations = own_services().ledger.allocations()
    assert [a.thread_id for a in allocations].count("once") == 1


def test_quickstart_runs(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "released (context-exit)" in r.stdout and "vision: spent $" in r.stdout

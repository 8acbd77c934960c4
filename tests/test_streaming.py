"""Progress on the graph's custom stream: votes, route and monitor ticks, readable as they come;
the CLI shows them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graph.orchestrator import Orchestrator
from tests.conftest import OrchFactory, fleet_toml, run_cli

REQ = {
    "project": "vision",
    "purpose": "training",
    "count": 2,
    "duration_hours": 0.5,
    "gpu_type": "A100",
}


def test_stream_updates_and_custom_yields_readable_progress(make_orch: OrchFactory) -> None:
    orch: Orchestrator = make_orch()
    seen: list[tuple[str, Any]] = list(
        orch.graph.stream(  # type: ignore[arg-type]
            {"request": REQ},
            {"configurable": {"thread_id": "s1"}},
            context=orch.context,
            stream_mode=["updates", "custom"],
        )
    )
    custom = [part for mode, part in seen if mode == "custom"]
    nodes = [line["node"] for line in custom]
    assert nodes[0] == "council" and nodes[1] == "route" and set(nodes[2:]) == {"monitor"}
    assert custom[1]["text"].startswith("route: 2 x A100 at $5.12/GPU-h")
    ticks = [line for line in custom if line["node"] == "monitor"]
    assert [t["tick"] for t in ticks] == list(range(1, len(ticks) + 1))
    assert ticks[0]["text"].startswith("tick 1: utilisation ") and "h left" in ticks[0]["text"]
    assert ticks[-1]["seconds_left"] <= 60
    updates = [next(iter(part)) for mode, part in seen if mode == "updates"]
    assert updates[:4] == ["validate", "council", "route", "allocate"]
    assert updates[-1] == "deallocate"


def test_orchestrator_hands_progress_to_its_caller(make_orch: OrchFactory) -> None:
    lines: list[dict[str, Any]] = []
    out = make_orch().request(REQ, on_progress=lines.append)
    assert out.status.value == "released"
    assert [ln["node"] for ln in lines[:2]] == ["council", "route"]
    # a tick a minute; at minute 30 the lease ends instead
    assert sum(ln["node"] == "monitor" for ln in lines) == 29


def test_the_cli_prints_the_council_and_the_route(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(clock={"time_scale": 3600}))  # an hour's lease in a second
    done = run_cli(
        "request",
        "--state-dir",
        str(tmp_path / "s"),
        "--fleet",
        str(fleet),
        "--project",
        "vision",
        "--purpose",
        "training",
        "--count",
        "1",
        "--hours",
        "1",
        "--gpu-type",
        "A100",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("  council: ") and lines[1].startswith("  route: 1 x A100")
    assert not any("tick " in line for line in lines)  # not a terminal: no live tick line
    assert any("released" in line for line in lines)

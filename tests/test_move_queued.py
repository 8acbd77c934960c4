"""`[scheduler] move_queued`: a queued request that names no type moves, when it wakes, to
another type of its pool that routing now prefers and that can start it now, rather than wait
for the type it was first routed to; in virtual time through the real graph, on SQLite and
PostgreSQL. It is on by default; off, the request waits for its first route's type."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fleet.clock import VirtualClock
from fleet.placement import Kind
from graph.scenario import Step, Submit, run_scenario
from tests.conftest import OrchFactory, small_config

HOUR = 3600.0


def ask(count: int, hours: float, **more: Any) -> dict[str, Any]:
    return {
        "project": "p",
        "purpose": "training",
        "count": count,
        "duration_hours": hours,
        "priority": "critical",  # approved without a vote: these tests are about placement
    } | more


# H100s (cheapest per unit of work here) held 10 h, A100s 1 h; then 2 GPUs for 2 A100-hours
STEPS: list[Step] = [
    Submit(0.0, "h100", ask(2, 10.0, gpu_type="H100")),
    Submit(0.0, "a100", ask(8, 1.0, gpu_type="A100")),
    Submit(0.1, "r", ask(2, 2.0)),
]


@pytest.mark.parametrize("move", [True, False], ids=["moves-by-default", "stays-when-off"])
def test_a_queued_request_moves_to_the_type_that_frees_first(
    make_orch: OrchFactory, database: str, move: bool
) -> None:
    clock = VirtualClock()
    on_server = {"database": database} if database.startswith("postgresql") else {}
    config = small_config() if move else small_config(scheduler={"move_queued": False})
    orch = make_orch(config, clock=clock, **on_server)
    start = clock.now()
    result = run_scenario(orch, clock, STEPS, lambda *a: None)
    r = result.outcomes["r"]
    assert r.allocation is not None and r.release is not None
    began = r.allocation.started_at.timestamp() - start
    [row] = [a for a in orch.services.ledger.allocations() if a.thread_id == "r"]
    if move:  # at its first poll after the A100s' lease ends
        poll = config.scheduler.poll_seconds
        assert r.allocation.gpu_type == row.gpu_type == "A100"
        assert 1.0 * HOUR <= began <= 1.0 * HOUR + poll
        assert row.price_per_hour == config.catalog["A100"].price_per_hour
        assert r.release.cost_usd == pytest.approx(5.12 * 2 * r.release.hours)
    else:
        assert r.allocation.gpu_type == row.gpu_type == "H100"
        assert began == pytest.approx(10.0 * HOUR)


def test_a_moved_request_placed_just_before_a_crash_resumes_on_its_type(
    make_orch: OrchFactory, tmp_path: Path
) -> None:
    """Its move and its placement are in no checkpoint yet (the wait writes one when it
    ends): a crash right after the placement resumes from before the wait, on the first
    route's H100, and the thread must say what the ledger holds: the A100, at its price."""
    clock = VirtualClock()
    orch = make_orch(small_config(), clock=clock)
    ledger, crash = orch.services.ledger, tmp_path / "crash"
    place, crashed_at = ledger.place, []

    def place_and_copy(request: Any, route: Any, thread_id: str, *a: Any, **k: Any) -> Any:
        """The ledger's own place; where it places "r", the state directory as a SIGKILL
        right then leaves it."""
        result = place(request, route, thread_id, *a, **k)
        if thread_id == "r" and result.decision.kind is Kind.PLACE and not crash.exists():
            shutil.copytree(orch.services.state_dir, crash)
            crashed_at.append(clock.now())
        return result

    ledger.place = place_and_copy  # type: ignore[method-assign]
    run_scenario(orch, clock, STEPS, lambda *a: None)
    orch.close()
    with sqlite3.connect(crash / "ledger.sqlite") as db:
        db.execute("DELETE FROM monitors")  # its process is gone
    again = make_orch(small_config(), clock=VirtualClock(start=crashed_at[0]), name="crash")
    before = again.graph.get_state({"configurable": {"thread_id": "r"}}).values
    assert before["route"].gpu_type == "H100"  # the checkpoint before the wait
    out = again.resume("r")
    assert out.allocation is not None and out.route is not None and out.release is not None
    assert out.allocation.gpu_type == out.route.gpu_type == "A100"
    assert out.route.est_cost_usd == pytest.approx(5.12 * 2 * 2.0)
    assert out.route.reason.startswith("moved while queued: ")
    assert out.release.cost_usd == pytest.approx(5.12 * 2 * out.release.hours)

"""EASY backfill in the fair queue: the head of a blocked line keeps its reservation, and a later
request starts now when it does not delay it. Hand-built cases on virtual time, through the
graph, and placement from several processes on one ledger."""

from __future__ import annotations

import math
import multiprocessing
from typing import Any

import pytest

from fleet.backfill import Ending, Reservation, backfill, reserve
from fleet.clock import VirtualClock
from fleet.ledger import Ledger
from fleet.ledger.rows import PlaceResult
from fleet.models import EventKind, GPURequest, ReleaseReason, RouteDecision
from fleet.placement import Kind
from fleet.routing import route
from fleet.simulated import SimulatedFleet
from fleet.topology import Topology
from graph.outcome import RequestOutcome
from graph.scenario import Submit, run_scenario
from tests.conftest import OrchFactory, small_config

# 8 A100 on two nodes and 2 H100; the council approves these requests without a vote
CONFIG = small_config(council={"auto_approve_max_gpus": 8, "auto_approve_max_usd": 10_000})
HOUR = 3600.0


def ask(project: str, count: int, hours: float, gpu_type: str = "A100") -> dict[str, Any]:
    return {
        "project": project,
        "purpose": "training",
        "gpu_type": gpu_type,
        "count": count,
        "duration_hours": hours,
    }


def run(make_orch: OrchFactory, *steps: Submit) -> dict[str, RequestOutcome]:
    clock = VirtualClock()
    result = run_scenario(make_orch(CONFIG, clock=clock), clock, list(steps), lambda *a: None)
    assert not result.errors
    return result.outcomes


def started(outcomes: dict[str, RequestOutcome], label: str) -> float:
    """Hours after the scenario began that `label` got its GPUs."""
    alloc = outcomes[label].allocation
    assert alloc is not None, outcomes[label].reason
    return (alloc.started_at.timestamp() - VirtualClock().now()) / HOUR


# 6 of the 8 A100 held until 4 h; at 0.1 h a request for all 8 becomes the head of the line,
# its reservation at 4 h with none to spare
RUNNING = Submit(0.0, "running", ask("r", 6, 4))
BIG = Submit(0.1, "big", ask("b", 8, 1))


def test_reservation_is_the_earliest_time_enough_gpus_are_back() -> None:
    endings = [Ending(5 * HOUR, 2), Ending(4 * HOUR, 6), Ending(4 * HOUR, 1)]
    assert reserve(8, 2, endings, 0.0) == Reservation(4 * HOUR, 1)  # both 4 h endings count
    assert reserve(2, 2, endings, 0.0) == Reservation(0.0, 0)  # free now
    assert reserve(3, 0, [Ending(-60.0, 3)], 0.0) == Reservation(0.0, 0)  # overdue: now
    assert reserve(12, 2, endings, 0.0).at == math.inf  # never: blocks nobody


def test_backfill_never_delays_the_reservation() -> None:
    res = Reservation(4 * HOUR, 2)
    assert backfill(8, 4 * HOUR, res) == res  # back by the reservation
    assert backfill(2, 9 * HOUR, res) == Reservation(4 * HOUR, 0)  # in the spare, used up
    assert backfill(3, 9 * HOUR, res) is None  # would take what the head needs
    assert backfill(1, 9 * HOUR, Reservation(math.inf, 0)) == Reservation(math.inf, 0)


def test_a_short_request_backfills_and_the_head_starts_on_time(make_orch: OrchFactory) -> None:
    """(a) and (e): the small request's lease ends at 2.2 h, before the head's 4 h: it runs
    now (before backfill it waited behind the head until 5 h); the head still starts at 4 h."""
    out = run(make_orch, RUNNING, BIG, Submit(0.2, "small", ask("s", 2, 2)))
    assert started(out, "small") == pytest.approx(0.2)
    assert EventKind.QUEUED not in [e.kind for e in out["small"].events]
    assert started(out, "big") == pytest.approx(4.0)
    big_waited = next(e.message for e in out["big"].events if e.kind is EventKind.QUEUED)
    assert "reserved for it from" in big_waited


def test_a_long_request_that_would_delay_the_head_waits(make_orch: OrchFactory) -> None:
    """(b) and (e): a lease to 5.2 h on the 2 free GPUs the head needs at 4 h: it waits, the
    head starts at 4 h, and the long one after the head is done."""
    out = run(make_orch, RUNNING, BIG, Submit(0.2, "long", ask("l", 2, 5)))
    assert started(out, "big") == pytest.approx(4.0)
    assert started(out, "long") == pytest.approx(5.0)
    waited = next(e.message for e in out["long"].events if e.kind is EventKind.QUEUED)
    assert "1 waiting request(s) ahead" in waited and "reserved from" in waited


def test_another_type_starts_now(make_orch: OrchFactory) -> None:
    """(c): the head can only use A100; a long H100 request does not touch its reservation."""
    out = run(make_orch, RUNNING, BIG, Submit(0.2, "other", ask("o", 2, 10, "H100")))
    assert started(out, "other") == pytest.approx(0.2)
    assert started(out, "big") == pytest.approx(4.0)


def test_spare_gpus_at_the_reservation_take_a_long_request(make_orch: OrchFactory) -> None:
    """(d) and (e): 4 A100 held until 4 h and a head for 6: at 4 h 2 are spare. The first long
    request (10 h) takes them now; the second would take what the head needs: it waits."""
    out = run(
        make_orch,
        Submit(0.0, "running", ask("r", 4, 4)),
        Submit(0.1, "big", ask("b", 6, 1)),
        Submit(0.2, "long-1", ask("l", 2, 10)),
        Submit(0.3, "long-2", ask("m", 2, 10)),
    )
    assert started(out, "long-1") == pytest.approx(0.2)
    assert started(out, "big") == pytest.approx(4.0)
    assert started(out, "long-2") == pytest.approx(5.0)


# ---- several processes on one ledger -------------------------------------------------------

T0 = 1_800_000_000.0


def place(
    ledger: Ledger, thread: str, now: float, project: str, count: int, hours: float
) -> PlaceResult:
    request = GPURequest.model_validate(ask(project, count, hours) | {"request_id": thread})
    decision = route(request, CONFIG, None)
    assert isinstance(decision, RouteDecision)
    inventory = SimulatedFleet(CONFIG).inventory()
    return ledger.place(request, decision, thread, now, inventory, Topology(CONFIG, inventory))


def _candidate(database: str, thread: str, hours: float, start: Any) -> None:
    """One process: wait for the others, then ask for 1 A100 at the same virtual time."""
    ledger = Ledger(database, CONFIG)
    try:
        start.wait()
        place(ledger, thread, T0 + 60, f"p-{thread}", 1, hours)
    finally:
        ledger.close()


def test_processes_backfill_no_more_than_is_free(database: str) -> None:
    """Six processes race for the 2 A100 free beside a blocked head: of the four short ones
    exactly two start, the two long ones (past the reservation) wait, no GPU is held twice; at
    4 h the head starts."""
    ledger = Ledger(database, CONFIG)
    holder = place(ledger, "holder", T0, "r", 6, 4)
    assert place(ledger, "head", T0, "b", 8, 1).decision.kind is Kind.QUEUE
    hours = {"s1": 1.0, "s2": 1.0, "s3": 1.0, "s4": 1.0, "l1": 10.0, "l2": 10.0}
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(len(hours))
    procs = [ctx.Process(target=_candidate, args=(database, t, h, start)) for t, h in hours.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = {r.thread_id: r for r in ledger.allocations()}
    active = sorted(t for t in hours if rows[t].state == "active")
    assert len(active) == 2 and all(t.startswith("s") for t in active)
    held = [g for r in rows.values() for g in r.gpu_ids if r.state == "active"]
    assert len(held) == len(set(held)) == 8
    for t in active:
        ledger.release(rows[t].id, ReleaseReason.LEASE_EXPIRED, T0 + 60 + HOUR)
    assert holder.row is not None
    ledger.release(holder.row.id, ReleaseReason.LEASE_EXPIRED, T0 + 4 * HOUR)
    assert place(ledger, "head", T0 + 4 * HOUR, "b", 8, 1).decision.kind is Kind.PLACE
    ledger.close()

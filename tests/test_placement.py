"""Fair scheduling: fair share, priority, aging, quotas, stale tickets, budgets."""

from __future__ import annotations

import pytest

from fleet.backfill import Ending
from fleet.config import FleetConfig, SchedulerSettings
from fleet.models import Priority
from fleet.placement import Kind, Snapshot, Ticket, decide, in_line
from fleet.scheduler import decayed, fair_share_factors, score
from fleet.simulated import SimulatedFleet
from fleet.topology import Topology
from tests.conftest import small_config

NOW = 1_000_000.0


def ticket(
    aid: str,
    project: str,
    count: int = 2,
    prio: Priority = Priority.NORMAL,
    enqueued: float = NOW,
    heartbeat: float = NOW,
) -> Ticket:
    return Ticket(aid, project, "A100", count, prio, enqueued, heartbeat, 1.0)


def snapshot(config: FleetConfig, free: int, waiting: list[Ticket], **kw: object) -> Snapshot:
    inventory = [g for g in SimulatedFleet(config).inventory() if g.gpu_type == "A100"]
    fields: dict[str, object] = dict(
        now=NOW,
        free=inventory[:free],
        waiting=waiting,
        endings=[],
        usage={},
        active_gpus={},
        budget_usd=None,
        spent_usd=0.0,
        committed_usd=0.0,
    )
    return Snapshot(**(fields | kw))  # type: ignore[arg-type]


def topo(config: FleetConfig) -> Topology:
    return Topology(config, SimulatedFleet(config).inventory())


def test_fair_share_formula() -> None:
    f = fair_share_factors({"heavy": 30.0, "light": 10.0}, {}, ["heavy", "light", "new"])
    assert f["new"] == 1.0
    assert f["heavy"] == pytest.approx(2 ** (-0.75 / (1 / 3)))
    assert f["light"] > f["heavy"]
    weighted = fair_share_factors({"a": 10.0, "b": 10.0}, {"a": 3.0}, ["a", "b"])
    assert weighted["a"] > weighted["b"]


def test_decay_halves_per_half_life() -> None:
    assert decayed(8.0, 0.0, 2 * 3600.0, half_life_hours=1) == pytest.approx(2.0)


def test_aging_saturates() -> None:
    s = SchedulerSettings(age_max_hours=1)
    assert score(Priority.LOW, 0.5, 7200, s) == score(Priority.LOW, 0.5, 3600, s)
    assert score(Priority.LOW, 0.5, 1800, s) < score(Priority.LOW, 0.5, 3600, s)


def test_lower_usage_goes_first(config: FleetConfig) -> None:
    # heavy queued first; light arrives later with no usage and is ahead of it
    heavy = ticket("h", "heavy", count=4, enqueued=NOW - 60)
    snap = snapshot(config, 4, [heavy], usage={"heavy": 100.0})
    assert decide(ticket("l", "light", count=4), 1.0, snap, config, topo(config)).kind is Kind.PLACE
    # and heavy, seeing light waiting, must wait
    light = ticket("l", "light", count=4)
    snap = snapshot(config, 4, [light], usage={"heavy": 100.0})
    d = decide(heavy, 1.0, snap, config, topo(config))
    assert d.kind is Kind.QUEUE and "ahead" in d.reason


def test_priority_beats_fair_share(config: FleetConfig) -> None:
    crit = ticket("c", "heavy", count=4, prio=Priority.CRITICAL)
    snap = snapshot(config, 4, [crit], usage={"heavy": 10.0, "light": 5.0})
    assert (
        decide(
            ticket("l", "light", count=4, prio=Priority.LOW), 1.0, snap, config, topo(config)
        ).kind
        is Kind.QUEUE
    )


def test_aging_lets_the_starved_through(config: FleetConfig) -> None:
    old = ticket("o", "heavy", count=4, prio=Priority.LOW, enqueued=NOW - 10 * 3600)
    snap = snapshot(config, 4, [old], usage={"heavy": 50.0})
    assert (
        decide(
            ticket("n", "heavy", count=4, prio=Priority.LOW), 1.0, snap, config, topo(config)
        ).kind
        is Kind.QUEUE
    )


def test_resumed_work_goes_back_ahead_of_new_work(config: FleetConfig) -> None:
    """Two requests of one project, the new one asked first: the one that resumes released
    work queues as if it had aged fully, so it starts first when GPUs free up."""
    new = ticket("n", "p", count=4, enqueued=NOW - 60)
    resumed = Ticket("r", "p", "A100", 4, Priority.NORMAL, NOW, NOW, 1.0, resumes=True)
    assert decide(resumed, 1.0, snapshot(config, 4, [new]), config, topo(config)).kind is Kind.PLACE
    assert decide(new, 1.0, snapshot(config, 4, [resumed]), config, topo(config)).kind is Kind.QUEUE


def test_stale_tickets_block_nobody(config: FleetConfig) -> None:
    gone = ticket("g", "light", count=4, heartbeat=NOW - 10 * 3600)
    snap = snapshot(config, 4, [gone], usage={"heavy": 10.0})
    assert decide(ticket("h", "heavy", count=4), 1.0, snap, config, topo(config)).kind is Kind.PLACE


def test_smaller_request_fits_beside_a_waiting_one(config: FleetConfig) -> None:
    ahead = ticket("a", "light", count=2)
    snap = snapshot(config, 4, [ahead], usage={"heavy": 10.0})
    assert decide(ticket("h", "heavy", count=2), 1.0, snap, config, topo(config)).kind is Kind.PLACE
    assert decide(ticket("h", "heavy", count=3), 1.0, snap, config, topo(config)).kind is Kind.QUEUE


def test_quota_waits(config: FleetConfig) -> None:
    limited = small_config(quotas={"default_max_gpus": 4})
    snap = snapshot(limited, 8, [], active_gpus={"p": 3})
    d = decide(ticket("x", "p", count=2), 1.0, snap, limited, topo(limited))
    assert d.kind is Kind.QUEUE and "quota" in d.reason


def test_budget_places_shortens_waits_or_denies(config: FleetConfig) -> None:
    """$50 of a $100 budget is left after the spend, $20 of it after the $30 expected of the
    running work: a whole lease up to $20 starts; up to $50 it waits for the running work; a
    dearer one is shortened to what $50 buys, down to half of it (limits.min_lease_share),
    and starts once nothing running stands in its way; one of which not half fits $50 is
    refused."""
    snap = snapshot(config, 8, [], budget_usd=100.0, spent_usd=50.0, committed_usd=30.0)
    whole = decide(ticket("x", "p"), 20.0, snap, config, topo(config))
    assert whole.kind is Kind.PLACE and whole.hours == 1.0 and "budget" not in whole.reason
    waits = decide(ticket("x", "p"), 45.0, snap, config, topo(config))
    assert waits.kind is Kind.QUEUE and "waits for the $30.00" in waits.reason
    assert decide(ticket("x", "p"), 80.0, snap, config, topo(config)).kind is Kind.QUEUE
    idle = snapshot(config, 8, [], budget_usd=100.0, spent_usd=50.0, committed_usd=0.0)
    short = decide(ticket("x", "p"), 80.0, idle, config, topo(config))
    assert short.kind is Kind.PLACE and short.hours == pytest.approx(50 / 80)
    assert "budget shortens its lease to 0.62 h" in short.reason
    denied = decide(ticket("x", "p"), 100.01, snap, config, topo(config))
    assert denied.kind is Kind.DENY and "even for 50% of the lease" in denied.reason
    never = small_config(limits={"min_lease_share": 1})
    assert decide(ticket("x", "p"), 20.01, snap, never, topo(never)).kind is Kind.QUEUE
    assert decide(ticket("x", "p"), 50.01, snap, never, topo(never)).kind is Kind.DENY


def test_in_line_is_the_line_that_starts_now(config: FleetConfig) -> None:
    """Whom to wake when GPUs free up: in fair order (here: the older request first), as long
    as their GPUs fit; the first that does not fit gets a reservation, and a later one only
    if it does not delay it (EASY backfill: tests/test_backfill.py)."""
    line = [
        ticket("c", "p3", 1, enqueued=NOW - 60),
        ticket("a", "p1", 4, enqueued=NOW - 300),
        ticket("b", "p2", 4, enqueued=NOW - 200),
    ]
    snap = snapshot(config, 5, line)
    assert [t.allocation_id for t in in_line(snap, config)] == ["a", "c"]  # b waits for a's
    # GPUs (1 h); c (1 GPU, 1 h) gives its GPU back by then
    assert [t.allocation_id for t in in_line(snapshot(config, 8, line), config)] == ["a", "b"]
    # a waits for 1 GPU back in 30 min, with none to spare: c (1 h) would delay it
    assert in_line(snapshot(config, 3, line, endings=[Ending(NOW + 1800, 1)]), config) == []


def test_a_budget_shortens_a_lease_longer_than_its_work_to_a_share_of_the_work(
    config: FleetConfig,
) -> None:
    """A 4 h lease (the hours asked) whose work takes 2 h on its type, at $10 an hour: $12
    left buys 1.2 h, over min_lease_share (0.5) of the 2 h of work though under half the
    lease, so it is placed with a 1.2 h lease; measured against the lease alone it was
    denied. $8 left buys 0.8 h, under half the work: denied."""
    me = Ticket("a", "p", "A100", 2, Priority.NORMAL, NOW, NOW, 4.0)
    for left, kind, hours in ((12.0, Kind.PLACE, 1.2), (8.0, Kind.DENY, None)):
        snap = snapshot(config, 4, [], budget_usd=left)
        d = decide(me, 40.0, snap, config, topo(config), work_hours=2.0)
        assert d.kind is kind and d.hours == (None if hours is None else pytest.approx(hours))
    assert (
        decide(me, 40.0, snapshot(config, 4, [], budget_usd=12.0), config, topo(config)).kind
        is Kind.DENY
    )

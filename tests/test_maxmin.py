"""Max-min fairness over effective throughput ([scheduler] policy = "max-min", fleet.maxmin):
the least served request goes first, running allocations served more yield after their notice
and minimum run (never one without a notice), and work on a slower type moves up to a faster
one nobody waits for; on SQLite and PostgreSQL, and through the graph in virtual time."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from fleet.clock import VirtualClock
from fleet.config import parse_fleet
from fleet.errors import ConfigError
from fleet.ledger.rows import LedgerRow
from fleet.maxmin import Runner, moves_up, service, sources, to_yield
from fleet.models import GPURequest, Priority, Purpose, ReleaseReason, RouteDecision
from fleet.placement import Kind, Snapshot, Ticket, line_order
from fleet.routing import route
from graph.scenario import Step, Submit, run_scenario
from tests.conftest import OrchFactory, fleet_toml, small_config
from tests.test_budget_admission import HOUR, T0, Fleet

MAXMIN = small_config(scheduler={"policy": "max-min"})
NOTICE = 120.0


def ticket(name: str, attained: float, count: int = 1, **more: Any) -> Ticket:
    fields: dict[str, Any] = {"priority": Priority.NORMAL, "enqueued_at": T0} | more
    return Ticket(
        name,
        "p",
        "A100",
        count,
        fields["priority"],
        fields["enqueued_at"],
        T0,
        1.0,
        fields.get("resumes", False),
        attained,
    )


def runner(
    name: str, attained: float, count: int = 1, priority: Priority = Priority.NORMAL
) -> Runner:
    return Runner(name, "p", count, priority, attained, NOTICE, T0 + 10 * HOUR)


def test_the_most_served_yield_for_the_least_served_by_at_least_the_quantum() -> None:
    line = [ticket("new", 0.0, count=2)]
    runners = [runner("long", 5.0), runner("mid", 1.0), runner("young", 0.2)]
    assert [(r.allocation_id, t.allocation_id) for r, t in to_yield(line, 0, runners, 0.5)] == [
        ("long", "new"),
        ("mid", "new"),
    ]
    # one GPU free already: only the most served yields
    assert [r.allocation_id for r, _ in to_yield(line, 1, runners, 0.5)] == ["long"]
    # not enough served more than the quantum: nobody is asked for nothing
    assert to_yield(line, 0, [runner("long", 5.0), runner("young", 0.2)], 0.5) == []
    # a higher priority never yields to a lower one
    assert (
        to_yield([ticket("new", 0.0)], 0, [runner("c", 9.0, priority=Priority.CRITICAL)], 0.5) == []
    )
    # a request that cannot be covered stops the walk: the one after it asks nobody
    line = [ticket("big", 0.0, count=4), ticket("small", 0.0)]
    assert to_yield(line, 0, [runner("long", 5.0)], 0.5) == []


def test_a_max_min_line_serves_the_least_served_first_priority_levels_first() -> None:
    snap = Snapshot(T0, [], [], [], {}, {}, None, 0.0, 0.0)
    old = ticket("old", 3.0, enqueued_at=T0 - HOUR, resumes=True)
    new = ticket("new", 0.0)
    urgent = ticket("urgent", 8.0, priority=Priority.CRITICAL)
    order = line_order(snap, MAXMIN, [old, new, urgent])
    assert [t.allocation_id for t in order] == ["urgent", "new", "old"]
    # fair share: released work goes back ahead of new work of its standing
    fair = line_order(snap, small_config(), [old, new])
    assert [t.allocation_id for t in fair] == ["old", "new"]


def test_service_is_per_job_under_max_min_and_per_gpu_under_least_attained() -> None:
    """Two hours of 8 H100s (2.0 an A100 each): 4 effective hours for the job under max-min
    (Gavel's equal time share per job), 32 under least-attained (Tiresias's GPU-time)."""
    assert service(2 * HOUR, "H100", 8, MAXMIN) == pytest.approx(4.0)
    las = small_config(scheduler={"policy": "least-attained"})
    assert service(2 * HOUR, "H100", 8, las) == pytest.approx(32.0)
    io_bound = MAXMIN.model_copy(update={"speeds": {"io": {"H100": 1.2}}})
    assert service(2 * HOUR, "H100", 8, io_bound, "io") == pytest.approx(2.4)


TRAINING, INFERENCE = Purpose.TRAINING, Purpose.INFERENCE
LENDING = small_config(scheduler={"policy": "max-min"}, preemption={"borrow": True})


def test_work_moves_up_to_a_faster_type_of_its_pool_for_no_more_per_unit() -> None:
    assert sources("H100", MAXMIN) == ["A100"] and sources("T4", MAXMIN) == []
    assert moves_up({}, TRAINING, "A100", "H100", MAXMIN)  # $4.00 a unit against $5.12
    assert not moves_up({}, TRAINING, "H100", "A100", MAXMIN)
    # a workload that gains little on the H100 costs more a unit there: it stays
    slow = MAXMIN.model_copy(update={"speeds": {"io-bound": {"A100": 1.0, "H100": 1.2}}})
    assert not moves_up({"workload": "io-bound"}, TRAINING, "A100", "H100", slow)


def test_where_the_fleet_lends_work_moves_up_to_another_pool_no_dearer_than_its_own() -> None:
    """Inference on a T4 ($3.51 a unit) moves up to a research RTX 4090 ($0.75, 5x as fast)
    only where the fleet lends and the card holds the memory asked for; never to an H100
    ($4.00 a unit: dearer than its own pool's cheapest), nor training to the slower 4090."""
    assert sources("RTX4090", LENDING) == ["A100", "H100", "T4"]
    assert moves_up({}, INFERENCE, "T4", "RTX4090", LENDING)
    assert not moves_up({}, INFERENCE, "T4", "RTX4090", MAXMIN)
    assert not moves_up({"min_memory_gb": 32}, INFERENCE, "T4", "RTX4090", LENDING)
    assert not moves_up({}, INFERENCE, "T4", "H100", LENDING)
    assert not moves_up({}, TRAINING, "A100", "RTX4090", LENDING)


def test_where_the_fleet_pays_for_speed_work_moves_up_to_any_faster_pool() -> None:
    """With `borrow_dearer`, research on its RTX 4090 ($0.75 a unit) and inference on a T4 move
    up to an idle H100 ($4.00), being faster there; never to a slower card, and within its own
    pool still for no more a unit."""
    dearer = LENDING.model_copy(
        update={"preemption": LENDING.preemption.model_copy(update={"borrow_dearer": True})}
    )
    assert moves_up({}, Purpose.RESEARCH, "RTX4090", "H100", dearer)
    assert not moves_up({}, Purpose.RESEARCH, "RTX4090", "H100", LENDING)
    assert moves_up({}, INFERENCE, "T4", "H100", dearer)
    assert not moves_up({}, TRAINING, "A100", "RTX4090", dearer)
    assert not moves_up({}, Purpose.RESEARCH, "H100", "RTX4090", dearer)
    slow = dearer.model_copy(update={"speeds": {"io-bound": {"A100": 1.0, "H100": 1.2}}})
    assert not moves_up({"workload": "io-bound"}, TRAINING, "A100", "H100", slow)


@pytest.fixture
def fleet(database: str) -> Iterator[Fleet]:
    f = Fleet(database, MAXMIN)
    yield f
    f.ledger.close()


def place(
    fleet: Fleet,
    gpu_type: str,
    count: int,
    hours: float,
    at: float,
    notice: float | None = NOTICE,
    named: bool = True,
    resumes: str | None = None,
    **more: Any,
) -> LedgerRow:
    """Place (or queue) a request for `count` GPUs of `gpu_type`; unnamed, routed there."""
    request = fleet.request("p", gpu_type, count, hours)
    decision = route(request, fleet.config, None)
    assert isinstance(decision, RouteDecision)
    update: dict[str, Any] = {"notice_seconds": notice, "resumes": resumes} | more
    request = request.model_copy(update=update | ({} if named else {"gpu_type": None}))
    thread = f"t{fleet.n}"
    result = fleet.ledger.place(request, decision, thread, at, fleet.inventory, fleet.topology)
    assert result.row is not None and result.decision.kind in (Kind.PLACE, Kind.QUEUE)
    ASKED[result.row.id] = (request, decision, thread)
    return result.row


ASKED: dict[str, tuple[GPURequest, RouteDecision, str]] = {}


def poll(fleet: Fleet, row: LedgerRow, at: float) -> LedgerRow:
    """A queued request tries again at `at`, as its wait node does (it stays in line)."""
    request, decision, thread = ASKED[row.id]
    result = fleet.ledger.place(request, decision, thread, at, fleet.inventory, fleet.topology)
    assert result.row is not None
    return result.row


def preemptions(fleet: Fleet) -> list[tuple[str, str]]:
    return [(e.target, e.detail) for e in fleet.ledger.audit_log() if e.action == "preempt"]


def test_a_waiting_request_has_the_most_served_allocation_yield_after_its_notice(
    fleet: Fleet,
) -> None:
    """All 8 A100s run one job (with a notice) from T0; a 1-GPU request queues 10 min in
    (nothing: the job has not run its minimum), then an hour in: the job yields its notice
    later, reason preempted, audited with both services; asked again, nothing more."""
    long = place(fleet, "A100", 8, 10.0, T0)
    early = place(fleet, "A100", 1, 1.0, T0 + 600.0)
    assert early.state == "queued"
    assert fleet.ledger.preempt_for(early, T0 + 600.0, fleet.inventory) == []
    [moved] = fleet.ledger.preempt_for(poll(fleet, early, T0 + HOUR), T0 + HOUR, fleet.inventory)
    assert (moved.id, moved.after) == (long.id, T0 + HOUR + NOTICE)
    lease = fleet.ledger.lease(long.id)
    assert (lease.deadline, lease.deadline_reason) == (T0 + HOUR + NOTICE, ReleaseReason.PREEMPTED)
    [(target, detail)] = preemptions(fleet)
    assert target == long.id
    assert f"max-min: {early.id} has received 0.00 effective h of service, this 1.00 h" in detail
    assert fleet.ledger.preempt_for(early, T0 + HOUR + 60.0, fleet.inventory) == []


@pytest.mark.parametrize("policy, notice", [("max-min", None), ("fair-share", NOTICE)])
def test_nothing_yields_without_a_notice_or_under_fair_share(
    database: str, policy: str, notice: float | None
) -> None:
    f = Fleet(database, small_config(scheduler={"policy": policy}))
    try:
        long = place(f, "A100", 8, 10.0, T0, notice=notice)
        wait = place(f, "A100", 1, 1.0, T0 + HOUR)
        assert f.ledger.preempt_for(poll(f, wait, T0 + 2 * HOUR), T0 + 2 * HOUR, f.inventory) == []
        assert f.ledger.move_up("A100", T0 + 2 * HOUR, f.inventory) == []
        assert f.ledger.lease(long.id).deadline_reason is ReleaseReason.LEASE_EXPIRED
    finally:
        f.ledger.close()


def test_a_resumed_request_carries_the_service_its_work_received(fleet: Fleet) -> None:
    """The 8-GPU job yields 1 h 2 min in and asks again (resumes): it waits behind the small
    one, which is served less, until the small one has received the quantum more than it."""
    long = place(fleet, "A100", 8, 10.0, T0)
    small = place(fleet, "A100", 1, 4.0, T0 + HOUR)
    fleet.ledger.preempt_for(small, T0 + HOUR, fleet.inventory)
    yielded = T0 + HOUR + NOTICE
    fleet.ledger.release(long.id, ReleaseReason.PREEMPTED, yielded)
    small = place(fleet, "A100", 1, 4.0, yielded)  # the same request placed now
    assert small.state == "active"
    again = place(fleet, "A100", 8, 9.0, yielded, resumes=long.id)
    assert again.state == "queued"
    served = (yielded - T0) / HOUR  # the A100 is the reference: 1.0 a GPU-hour
    at = yielded + HOUR
    assert fleet.ledger.preempt_for(poll(fleet, again, at), at, fleet.inventory) == []
    at = yielded + (served + 0.5) * HOUR + 60.0
    [moved] = fleet.ledger.preempt_for(poll(fleet, again, at), at, fleet.inventory)
    assert moved.id == small.id
    detail = preemptions(fleet)[-1][1]
    assert f"{again.id} has received {served:.2f} effective h of service" in detail


def test_work_on_a_slower_type_moves_up_to_a_faster_one_nobody_waits_for(
    fleet: Fleet,
) -> None:
    """Both H100s are held; an unnamed job runs on an A100 (so do a named one and one that
    ends soon). When the H100s come free, only the unnamed one with its lease ahead yields."""
    h100 = place(fleet, "H100", 2, 2.0, T0)
    mover = place(fleet, "A100", 1, 10.0, T0, named=False)
    named = place(fleet, "A100", 1, 10.0, T0)
    ending = place(fleet, "A100", 1, 2.5, T0, named=False)
    fleet.ledger.release(h100.id, ReleaseReason.EXPLICIT, T0 + 2 * HOUR)
    [moved] = fleet.ledger.move_up("H100", T0 + 2 * HOUR, fleet.inventory)
    assert (moved.id, moved.after) == (mover.id, T0 + 2 * HOUR + NOTICE)
    assert "2 H100 spare with nobody waiting, faster than its A100" in preemptions(fleet)[-1][1]
    for row in (named, ending):
        assert fleet.ledger.lease(row.id).deadline_reason is ReleaseReason.LEASE_EXPIRED
    # the mover already on its way: nothing more moves for the same spare GPUs
    assert fleet.ledger.move_up("H100", T0 + 2 * HOUR + 60.0, fleet.inventory) == []


def test_the_least_served_moves_up_first(fleet: Fleet) -> None:
    """One H100 comes free; two unnamed jobs run on A100s, one from T0 with the longer
    lease, one from an hour later: the later, served less, moves up (as the line would serve
    it first), not the one with the most lease left."""
    place(fleet, "H100", 1, 10.0, T0)
    short = place(fleet, "H100", 1, 2.0, T0)
    place(fleet, "A100", 1, 20.0, T0, named=False)
    later = place(fleet, "A100", 1, 10.0, T0 + HOUR, named=False)
    fleet.ledger.release(short.id, ReleaseReason.EXPLICIT, T0 + 2 * HOUR)
    [moved] = fleet.ledger.move_up("H100", T0 + 2 * HOUR, fleet.inventory)
    assert moved.id == later.id


def test_new_work_takes_back_the_faster_type_that_work_moved_up_to(fleet: Fleet) -> None:
    """Work moved up from an A100 to a free H100 holds it only until new work comes for it:
    once its minimum run there is done, routing sees the H100 start new work after the
    mover's notice, and the new request, queued, has it yield (a resumed request, one of a
    lower priority or one for more GPUs than come back so does not count it)."""
    place(fleet, "H100", 1, 20.0, T0)
    gone = place(fleet, "H100", 1, 1.0, T0)
    mover = place(fleet, "A100", 1, 10.0, T0, named=False)
    fleet.ledger.release(gone.id, ReleaseReason.EXPLICIT, T0 + HOUR)
    [moved] = fleet.ledger.move_up("H100", T0 + HOUR, fleet.inventory)
    fleet.ledger.release(mover.id, ReleaseReason.PREEMPTED, moved.after)
    up = place(fleet, "H100", 1, 9.0, moved.after, named=False, resumes=mover.id)
    assert up.state == "active"

    def starts(at: float, new_work: Priority | None, count: int = 1) -> float:
        hours = fleet.ledger.starts_in_hours(
            ["H100"], count, at, fleet.inventory, new_work=new_work
        )
        return hours["H100"]

    early = moved.after + 10 * 60.0  # its minimum run on the H100 is not done
    assert starts(early, Priority.NORMAL) == starts(early, None) > 1.0
    at = moved.after + HOUR
    assert starts(at, Priority.NORMAL) == pytest.approx(NOTICE / HOUR)
    assert starts(at, None) > 1.0
    assert starts(at, Priority.LOW) > 1.0  # work of a lower priority takes nothing back
    assert starts(at, Priority.NORMAL, count=2) > 1.0  # nor does a bigger request
    new = place(fleet, "H100", 1, 2.0, at)
    assert new.state == "queued"
    [back] = fleet.ledger.preempt_for(new, at, fleet.inventory)
    assert (back.id, back.after) == (up.id, at + NOTICE)
    detail = preemptions(fleet)[-1][1]
    assert f"new work {new.id} takes back the H100 that this work moved up to from A100" in detail


def test_where_the_fleet_lends_inference_moves_up_to_a_free_research_card(
    database: str,
) -> None:
    """Max-min with borrowing: two inference jobs run on the T4s; the RTX 4090s are held,
    then come free. The one that fits their memory yields to go on there; the one asking
    for 32 GB stays."""
    f = Fleet(database, LENDING)
    try:
        held = place(f, "RTX4090", 2, 2.0, T0)
        mover = place(f, "T4", 1, 10.0, T0, named=False)
        roomy = place(f, "T4", 1, 10.0, T0, named=False, min_memory_gb=32.0)
        f.ledger.release(held.id, ReleaseReason.EXPLICIT, T0 + 2 * HOUR)
        [moved] = f.ledger.move_up("RTX4090", T0 + 2 * HOUR, f.inventory)
        assert moved.id == mover.id
        assert "2 RTX4090 spare with nobody waiting, faster than its T4" in preemptions(f)[-1][1]
        assert f.ledger.lease(roomy.id).deadline_reason is ReleaseReason.LEASE_EXPIRED
    finally:
        f.ledger.close()


@pytest.mark.parametrize(("budget", "moves"), [(None, True), (100.0, True), (43.0, False)])
def test_work_moves_up_to_a_dearer_loan_only_where_its_budget_pays_for_it(
    database: str, budget: float | None, moves: bool
) -> None:
    """Max-min with dearer loans: research runs 10 h on an RTX 4090 ($0.60 an hour); the
    H100s, held until 2 h for $32, come free. The 8 h of its lease left take 3.2 h there,
    $25.60: with no budget, or $100, it moves up; with $43 (about $10 left) it stays, as
    routing would send it back to its card."""
    dearer = LENDING.preemption.model_copy(update={"borrow_dearer": True})
    f = Fleet(database, LENDING.model_copy(update={"preemption": dearer}))
    try:
        held = place(f, "H100", 2, 2.0, T0)
        research = place(f, "RTX4090", 1, 10.0, T0, named=False)
        f.ledger.release(held.id, ReleaseReason.EXPLICIT, T0 + 2 * HOUR)
        if budget is not None:
            f.ledger.set_budget("p", budget, T0 + 2 * HOUR)
        moved = f.ledger.move_up("H100", T0 + 2 * HOUR, f.inventory)
        assert [m.id for m in moved] == ([research.id] if moves else [])
    finally:
        f.ledger.close()


def ask(count: int, hours: float, **more: Any) -> dict[str, Any]:
    return {
        "project": "p",
        "purpose": "training",
        "gpu_type": "A100",
        "count": count,
        "duration_hours": hours,
        "priority": "critical",  # approved without a vote: these tests are about placement
    } | more


@pytest.mark.parametrize("policy", ["max-min", "least-attained"])
def test_through_the_graph_a_short_job_runs_when_the_long_one_yields(
    make_orch: OrchFactory, database: str, policy: str
) -> None:
    """The long job holds every A100 from 0 with a 120 s notice; the short one asks at 1 h
    and starts when the long one has yielded, charged once for what it held."""
    clock = VirtualClock()
    on_server = {"database": database} if database.startswith("postgresql") else {}
    orch = make_orch(small_config(scheduler={"policy": policy}), clock=clock, **on_server)
    start = clock.now()
    steps: list[Step] = [
        Submit(0.0, "long", ask(8, 10.0, notice_seconds=NOTICE)),
        Submit(1.0, "short", ask(1, 0.5)),
    ]
    result = run_scenario(orch, clock, steps, lambda *a: None)
    long, short = result.outcomes["long"], result.outcomes["short"]
    assert long.release is not None and long.release.reason is ReleaseReason.PREEMPTED
    assert long.release.released_at.timestamp() - start == pytest.approx(HOUR + NOTICE)
    price = MAXMIN.catalog["A100"].price_per_hour
    assert long.release.cost_usd == pytest.approx(8 * price * (HOUR + NOTICE) / HOUR)
    assert short.allocation is not None
    assert short.allocation.started_at.timestamp() - start == pytest.approx(HOUR + NOTICE)


def test_an_unknown_policy_in_the_fleet_file_is_one_clear_error() -> None:
    expected = "scheduler.policy: Input should be 'fair-share', 'max-min' or 'least-attained'"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_fleet(fleet_toml(scheduler={"policy": "maxmin"}))

"""Admission on expected cost: work the padded worst case refused now starts, and no interleaving
of placements, releases, budget changes and time ever spends above a budget."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fleet.budget import (
    MIN_FACTOR,
    PRIOR_LEASES,
    RECORDS,
    Active,
    admissible_usd,
    admits,
    committed,
    usage_factor,
    used_share,
)
from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.ledger import Ledger
from fleet.ledger.rows import LedgerRow, PlaceResult
from fleet.models import GPURequest, ReleaseReason, RouteDecision
from fleet.placement import Kind
from fleet.routing import Refusal, route
from fleet.simulated import SimulatedFleet
from fleet.topology import Topology
from tests.conftest import small_config

T0 = 1_800_000_000.0
HOUR = 3600.0
PROJECTS = ["a", "b", "c"]
TYPES = ["A100", "H100", "T4", "RTX4090"]
PURPOSE = {"T4": "inference", "RTX4090": "research"}


# ---- the usage factor ------------------------------------------------------------------------


def test_a_new_project_is_priced_at_its_worst_case() -> None:
    assert usage_factor([]) == 1.0
    assert usage_factor([0.5]) == pytest.approx(2.5 / 3)  # two whole leases still weigh


def test_the_factor_is_the_mean_of_the_recent_record_and_two_whole_leases() -> None:
    assert usage_factor([0.5] * RECORDS) == pytest.approx(12 / 22)
    assert usage_factor([1.0] * 3 + [0.5] * RECORDS) == pytest.approx(13.5 / 22)  # newest 20
    assert usage_factor([0.0] * RECORDS) == MIN_FACTOR
    assert PRIOR_LEASES == 2


def test_a_share_cut_by_the_budget_counts_as_a_whole_lease() -> None:
    assert used_share(1.0, 4.0, stopped_by_budget=False) == 0.25
    assert used_share(1.0, 4.0, stopped_by_budget=True) == 1.0
    assert used_share(5.0, 4.0, stopped_by_budget=False) == 1.0


def test_expected_cost_never_passes_the_deadline() -> None:
    cut = Active("a", 1.0, 0.0, lease_end=100.0, deadline=30.0)
    full = Active("b", 1.0, 0.0, lease_end=100.0, deadline=100.0)
    assert committed([cut, full], 0.5) == pytest.approx(30.0 + 50.0)
    assert committed([cut, full], 1.0) == pytest.approx(130.0)  # q = 1: the old worst case
    room = admissible_usd(200.0, 40.0, 80.0, 0.5)
    assert room == pytest.approx(160.0) and admits(160.0, room) and not admits(160.01, room)


# ---- the ledger: a hand-built record -----------------------------------------------------------


class Fleet:
    def __init__(self, path: Path | str, config: FleetConfig) -> None:
        self.config = config
        self.ledger = Ledger(path, config, durable=False)
        self.inventory = SimulatedFleet(config).inventory()
        self.topology = Topology(config, self.inventory)
        self.n = 0

    def request(self, project: str, gpu_type: str, count: int, hours: float) -> GPURequest:
        self.n += 1
        return GPURequest(
            project=project,
            purpose=PURPOSE.get(gpu_type, "training"),
            gpu_type=gpu_type,
            count=count,
            duration_hours=hours,
            request_id=f"r{self.n}",
        )

    def place(self, request: GPURequest, now: float) -> PlaceResult:
        decision = route(request, self.config, None)
        assert isinstance(decision, RouteDecision)
        return self.ledger.place(
            request, decision, f"t{self.n}", now, self.inventory, self.topology
        )

    def record(self, project: str, shares: list[float], start: float) -> float:
        """Finished 1 x T4, 1 h leases that held `shares` of their lease; the time after."""
        for share in shares:
            row = self.place(self.request(project, "T4", 1, 1.0), start).row
            assert row is not None and row.state == "active"
            self.ledger.release(row.id, ReleaseReason.EXPLICIT, start + share * HOUR)
            start += HOUR
        return start


@pytest.fixture
def fleet(database: str, config: FleetConfig) -> Iterator[Fleet]:
    f = Fleet(database, config)
    yield f
    f.ledger.close()


def test_a_project_that_uses_half_its_leases_gets_work_the_worst_case_refused(fleet: Fleet) -> None:
    """20 finished leases held for half their time, the fleet's only ones: q = (10 + 2 x 0.5)
    / 22 = 0.5 (the prior leases are held for the fleet's share). With $30 left, two 2 x A100
    x 2 h requests ($20.48 worst case, $10.24 expected each) both start; the old
    rule ($20.48 + $20.48 > $30) refused the second. Their deadlines then stop both when the
    spend would reach the budget."""
    now = fleet.record("p", [0.5] * RECORDS, T0 - 30 * HOUR)
    assert now <= T0
    spent = fleet.ledger.costs(T0)[0].spent_usd
    fleet.ledger.set_budget("p", spent + 30.0, T0)
    first = fleet.place(fleet.request("p", "A100", 2, 2.0), T0)
    assert first.decision.kind is Kind.PLACE and first.row is not None
    [cost] = fleet.ledger.costs(T0)
    assert cost.budget_usd is not None
    old_remaining = cost.budget_usd - cost.spent_usd - cost.committed_usd
    assert old_remaining == pytest.approx(30.0 - 20.48)  # the old rule: 20.48 does not fit

    second_request = fleet.request("p", "A100", 2, 2.0)
    assert isinstance(
        route(second_request, fleet.config, fleet.ledger.remaining_usd("p")), RouteDecision
    )  # the route node's pre-check agrees with the ledger
    second = fleet.place(second_request, T0)
    assert second.decision.kind is Kind.PLACE and second.row is not None
    assert [m.id for m in second.moved] == [first.row.id]  # the first now ends earlier
    cut = T0 + 30.0 / 20.48 * HOUR  # both accrue 20.48 $/h together until $30 is spent
    for row in (fleet.ledger.get(first.row.id), fleet.ledger.get(second.row.id)):
        assert row.deadline == pytest.approx(cut)
        assert row.deadline_reason is ReleaseReason.BUDGET

    fleet.ledger.release(first.row.id, ReleaseReason.EXPLICIT, T0 + 0.5 * HOUR)  # $5.12
    after = fleet.ledger.get(second.row.id)  # $24.88 left covers its whole lease again
    assert after.deadline == after.lease_end
    assert after.deadline_reason is ReleaseReason.LEASE_EXPIRED


def test_the_budget_shortens_a_lease_then_makes_the_next_wait(fleet: Fleet) -> None:
    """With q = 0.5 and $30 of budget, a 2 x A100 x 8 h request ($81.92 worst case, $40.96
    expected) starts with the lease that $30 buys at q (5.86 h: at least half of its lease,
    limits.min_lease_share); a next one then waits for the running work rather than being
    refused or shortened, and starts when that ends early; one of which not half fits what
    the spend leaves is refused."""
    now = fleet.record("p", [0.5] * RECORDS, T0 - 30 * HOUR)
    assert now <= T0
    spent = fleet.ledger.costs(T0)[0].spent_usd
    fleet.ledger.set_budget("p", spent + 30.0, T0)
    q = 0.5
    first = fleet.place(fleet.request("p", "A100", 2, 8.0), T0)
    assert first.decision.kind is Kind.PLACE and first.row is not None
    shortened = 30.0 / q / 10.24
    assert first.decision.hours == pytest.approx(shortened)
    assert first.row.lease_end == pytest.approx(T0 + shortened * HOUR)
    assert "budget shortens its lease to 5.86 h" in first.decision.reason

    second_request = fleet.request("p", "A100", 2, 2.0)
    assert isinstance(
        route(second_request, fleet.config, fleet.ledger.remaining_usd("p", running=False)),
        RouteDecision,
    )
    second = fleet.place(second_request, T0)
    assert second.decision.kind is Kind.QUEUE and "waits for" in second.decision.reason
    fleet.ledger.release(first.row.id, ReleaseReason.EXPLICIT, T0 + 0.25 * HOUR)  # $5.12
    placed = fleet.place(second_request, T0 + 0.25 * HOUR)
    assert placed.decision.kind is Kind.PLACE and placed.decision.hours == 2.0

    over = fleet.request("p", "A100", 2, 12.0)  # $122.88: not half of it fits what spend leaves
    assert isinstance(
        route(over, fleet.config, fleet.ledger.remaining_usd("p", running=False)), Refusal
    )
    assert fleet.place(over, T0 + 0.25 * HOUR).decision.kind is Kind.DENY


def test_a_new_project_on_a_new_fleet_is_admitted_on_its_worst_case(fleet: Fleet) -> None:
    """Without any record in the fleet q = 1: the second request waits for the first."""
    fleet.ledger.set_budget("p", 25.0, T0)
    assert fleet.place(fleet.request("p", "A100", 2, 2.0), T0).decision.kind is Kind.PLACE
    assert fleet.ledger.remaining_usd("p") == pytest.approx(25.0 - 20.48)
    assert fleet.ledger.remaining_usd("p", running=False) == pytest.approx(25.0)
    second = fleet.place(fleet.request("p", "A100", 2, 2.0), T0).decision
    assert second.kind is Kind.QUEUE and "waits for the $20.48" in second.reason


def test_a_budget_cut_record_keeps_the_worst_case(fleet: Fleet) -> None:
    """Leases the budget stopped say nothing about how long they would have run."""
    now = fleet.record("p", [0.5] * RECORDS, T0 - 30 * HOUR)
    fleet.ledger.set_budget("p", fleet.ledger.costs(now)[0].spent_usd + 1.5, now)
    for _ in range(3):  # 1 x T4 for 4 h ($2.10, expected $1.05): each is cut by the budget
        row = fleet.place(fleet.request("p", "T4", 1, 4.0), now).row
        assert row is not None and row.deadline_reason is ReleaseReason.BUDGET
        assert row.deadline is not None
        fleet.ledger.release(row.id, ReleaseReason.BUDGET, row.deadline)
        now = row.deadline
        fleet.ledger.set_budget("p", fleet.ledger.costs(now)[0].spent_usd + 1.5, now)
    # the 3 cut leases count whole: q = (3 + 17 x 0.5 + 2 x 13 / 23) / 22, the prior
    # leases held for the share of the fleet's 23 records
    assert fleet.ledger.remaining_usd("p") == pytest.approx(1.5 / ((11.5 + 26 / 23) / 22))


# ---- any interleaving ------------------------------------------------------------------------

# a record long enough to count: each lease held for a share of at most some typical share
USES = st.floats(0.05, 1.0).flatmap(
    lambda most: st.lists(st.floats(0.0, most), min_size=RECORDS - 2, max_size=RECORDS)
)


class BudgetMachine(RuleBasedStateMachine):
    """Projects with a record, random placements, early releases, budgets lowered and raised,
    and time passing with monitors (each allocation released at its deadline) or without them
    (reconciliation at start-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.fleet = Fleet(Path(self.tmp.name) / "ledger.sqlite", small_config())
        self.ledger = self.fleet.ledger
        self.now = T0

    def teardown(self) -> None:
        self.ledger.close()
        self.tmp.cleanup()

    @initialize(
        records=st.fixed_dictionaries({p: st.one_of(st.just([]), USES) for p in PROJECTS}),
        budgets=st.fixed_dictionaries(
            {p: st.one_of(st.none(), st.floats(0, 200)) for p in PROJECTS}
        ),
    )
    def history(self, records: dict[str, list[float]], budgets: dict[str, float | None]) -> None:
        start = T0 - 200 * HOUR
        for project in PROJECTS:
            start = self.fleet.record(project, records[project], start)
        for project, usd in budgets.items():
            if usd is not None:
                self.ledger.set_budget(project, self.spent().get(project, 0.0) + usd, self.now)

    @rule(
        project=st.sampled_from(PROJECTS),
        gpu_type=st.sampled_from(TYPES),
        count=st.integers(1, 4),
        hours=st.floats(0.05, 8),
    )
    def place(self, project: str, gpu_type: str, count: int, hours: float) -> None:
        request = self.fleet.request(project, gpu_type, count, hours)
        free = route(request, self.fleet.config, None)
        if not isinstance(free, RouteDecision):
            return
        checked = route(
            request, self.fleet.config, self.ledger.remaining_usd(project, running=False)
        )
        old_admits = free.est_cost_usd <= self.old_remaining(project) + 1e-9
        result = self.fleet.place(request, self.now)
        denied = result.decision.kind is Kind.DENY
        assert denied == isinstance(checked, Refusal)  # the pre-check is the ledger's rule
        assert not (denied and old_admits)  # admits all the worst case did, and more

    @precondition(lambda self: bool(self.ledger.live()))
    @rule(data=st.data())
    def release_early(self, data: st.DataObject) -> None:
        row = data.draw(st.sampled_from(self.ledger.live()))
        first = self.ledger.release(row.id, ReleaseReason.EXPLICIT, self.now)
        assert self.ledger.release(row.id, ReleaseReason.IDLE, self.now + 60) == first

    @rule(project=st.sampled_from(PROJECTS), usd=st.floats(0, 300))
    def set_budget(self, project: str, usd: float) -> None:
        with contextlib.suppress(InvalidInput):  # below what was spent or accrued
            self.ledger.set_budget(project, usd, self.now)

    @rule(minutes=st.floats(1, 600), monitors=st.booleans())
    def advance(self, minutes: float, monitors: bool) -> None:
        target = self.now + minutes * 60
        while monitors and (due := self.next_due(target)) is not None:
            assert due.deadline is not None and due.deadline_reason is not None
            self.now = max(self.now, due.deadline)
            self.ledger.release(due.id, due.deadline_reason, due.deadline)
        self.now = target
        if not monitors:
            self.ledger.reconcile(self.now)  # as if every process had been down meanwhile

    @invariant()
    def no_spend_above_a_budget(self) -> None:
        """Charged spend + what active allocations accrue until their deadlines <= budget;
        and when the budget cuts a lease still running, exactly the budget (nothing is cut
        needlessly)."""
        spent = self.spent()
        for project, budget in self.budgets().items():
            active = self.active(project)
            committed = sum(r.rate_usd_per_s * (self.deadline(r) - self.started(r)) for r in active)
            assert spent.get(project, 0.0) + committed <= budget + 1e-6
            if any(self.now < self.deadline(r) < self.lease_end(r) for r in active):
                assert spent.get(project, 0.0) + committed == pytest.approx(budget, abs=1e-6)

    @invariant()
    def the_database_sums_what_budget_defines(self) -> None:
        """The ledger's SQL sum of expected costs is budget.committed of its actives."""
        for project in self.budgets():
            with self.ledger.reading() as db:
                expected, factor = self.ledger._expected(db, project)
                actives = self.ledger._actives(db, project)
            assert expected == pytest.approx(committed(actives, factor), abs=1e-9)

    @invariant()
    def deadlines_within_leases(self) -> None:
        for r in self.ledger.allocations("active"):
            assert self.started(r) <= self.deadline(r) <= self.lease_end(r)

    @invariant()
    def charged_once(self) -> None:
        released = sorted(
            r.id for r in self.ledger.allocations("released") if r.started_at is not None
        )
        charges = self.ledger.query("SELECT allocation_id, project, amount_usd FROM charges")
        assert sorted(c[0] for c in charges) == released
        assert sorted(h.allocation_id for h in self.ledger.history(with_requests=False)) == released
        by_project: dict[str, float] = {}
        for _, project, amount in charges:
            by_project[project] = by_project.get(project, 0.0) + amount
        for project, usd in self.spent().items():
            assert usd == pytest.approx(by_project.get(project, 0.0), abs=1e-6)

    # ---- reads -----------------------------------------------------------------------------

    def next_due(self, until: float) -> LedgerRow | None:
        due = [r for r in self.ledger.allocations("active") if self.deadline(r) <= until]
        return min(due, key=lambda r: (self.deadline(r), r.id), default=None)

    def spent(self) -> dict[str, float]:
        return {r[0]: float(r[1]) for r in self.ledger.query("SELECT project, usd FROM spend")}

    def budgets(self) -> dict[str, float]:
        return {
            c.project: c.budget_usd for c in self.ledger.costs(self.now) if c.budget_usd is not None
        }

    def active(self, project: str) -> list[LedgerRow]:
        return [r for r in self.ledger.allocations("active") if r.project == project]

    def old_remaining(self, project: str) -> float:
        """What the old rule left: budget - spent - worst case of the active allocations."""
        cost = next((c for c in self.ledger.costs(self.now) if c.project == project), None)
        if cost is None or cost.budget_usd is None:
            return float("inf")
        return cost.budget_usd - cost.spent_usd - cost.committed_usd

    @staticmethod
    def started(r: LedgerRow) -> float:
        assert r.started_at is not None
        return r.started_at

    @staticmethod
    def deadline(r: LedgerRow) -> float:
        assert r.deadline is not None
        return r.deadline

    @staticmethod
    def lease_end(r: LedgerRow) -> float:
        assert r.lease_end is not None
        return r.lease_end


BudgetMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestBudgetMachine = BudgetMachine.TestCase

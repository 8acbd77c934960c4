"""Property tests over random request streams: budgets hold, GPUs come back, one release each."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fleet.clock import VirtualClock
from fleet.ledger import Ledger
from fleet.models import GPURequest, ReleaseReason, RouteDecision, Status
from fleet.placement import Kind
from fleet.routing import route
from fleet.simulated import SimulatedFleet
from fleet.topology import Topology
from graph.orchestrator import Orchestrator
from graph.scenario import SetBudget, Step, Submit, run_scenario
from tests.conftest import small_config

PROJECTS = ["a", "b", "c"]
TYPES = ["A100", "H100", "T4", "RTX4090"]


class LedgerMachine(RuleBasedStateMachine):
    """Random placements, releases, budget changes and downtime against one ledger."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.config = small_config()
        self.ledger = Ledger(Path(self.tmp.name) / "ledger.sqlite", self.config)
        self.inventory = SimulatedFleet(self.config).inventory()
        self.topology = Topology(self.config, self.inventory)
        self.now = 1_800_000_000.0
        self.n = 0
        self.placed: set[str] = set()

    def teardown(self) -> None:
        self.ledger.close()
        self.tmp.cleanup()

    @rule(
        project=st.sampled_from(PROJECTS),
        gpu_type=st.sampled_from(TYPES),
        count=st.integers(1, 4),
        hours=st.floats(0.05, 8),
    )
    def place(self, project: str, gpu_type: str, count: int, hours: float) -> None:
        self.n += 1
        purpose = {"T4": "inference", "RTX4090": "research"}.get(gpu_type, "training")
        request = GPURequest(
            project=project,
            purpose=purpose,
            gpu_type=gpu_type,
            count=count,
            duration_hours=hours,
            request_id=f"r{self.n}",
        )
        decision = route(request, self.config, None)
        if not isinstance(decision, RouteDecision):
            return
        result = self.ledger.place(
            request, decision, f"t{self.n}", self.now, self.inventory, self.topology
        )
        if result.decision.kind is Kind.PLACE:
            assert result.row is not None
            self.placed.add(result.row.id)

    @precondition(lambda self: bool(self.placed))
    @rule(data=st.data(), reason=st.sampled_from(list(ReleaseReason)))
    def release(self, data: st.DataObject, reason: ReleaseReason) -> None:
        aid = data.draw(st.sampled_from(sorted(self.placed)))
        first = self.ledger.release(aid, reason, self.now)
        assert self.ledger.release(aid, ReleaseReason.EXPLICIT, self.now + 60) == first

    @rule()
    def drain_and_refill(self) -> None:
        """Once everything is released, every GPU is placeable again."""
        for row in self.ledger.allocations():
            self.ledger.release(row.id, ReleaseReason.EXPLICIT, self.now)
        self.n += 1
        request = GPURequest(
            project="fresh", gpu_type="A100", count=8, duration_hours=0.1, request_id=f"r{self.n}"
        )
        decision = route(request, self.config, None)
        assert isinstance(decision, RouteDecision)
        result = self.ledger.place(
            request, decision, f"t{self.n}", self.now, self.inventory, self.topology
        )
        assert result.decision.kind is Kind.PLACE and result.row is not None
        self.placed.add(result.row.id)

    @rule(minutes=st.floats(1, 600))
    def advance(self, minutes: float) -> None:
        self.now += minutes * 60
        self.ledger.reconcile(self.now)  # as if every process had died meanwhile

    @rule(project=st.sampled_from(PROJECTS), usd=st.floats(0, 500))
    def set_budget(self, project: str, usd: float) -> None:
        with contextlib.suppress(ValueError):  # below what was spent or accrued: refused
            self.ledger.set_budget(project, usd, self.now)

    @invariant()
    def gpus_held_once(self) -> None:
        active = self.ledger.allocations("active")
        ids = [g for a in active for g in a.gpu_ids]
        assert len(ids) == len(set(ids))
        assert sorted(self.ledger.holders()) == sorted(ids)

    @invariant()
    def budgets_hold(self) -> None:
        for c in self.ledger.costs(self.now):
            if c.budget_usd is not None:
                assert c.spent_usd + c.committed_usd <= c.budget_usd + 1e-6

    @invariant()
    def one_release_each(self) -> None:
        db = sqlite3.connect(self.ledger.name)
        try:
            released = db.execute(
                "SELECT id FROM allocations WHERE state='released' AND started_at IS NOT NULL"
            ).fetchall()
            charges = db.execute("SELECT allocation_id FROM charges").fetchall()
            history = db.execute("SELECT allocation_id FROM history").fetchall()
        finally:
            db.close()
        assert sorted(released) == sorted(charges) == sorted(history)


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase


def test_freed_gpus_are_allocatable_again(tmp_path: Path) -> None:
    config = small_config()
    ledger = Ledger(tmp_path / "l.sqlite", config)
    inventory = SimulatedFleet(config).inventory()
    topology = Topology(config, inventory)
    for round_ in range(3):
        ids = []
        for i in range(8):
            req = GPURequest(
                project="p", gpu_type="A100", count=1, duration_hours=1, request_id=f"{round_}-{i}"
            )
            decision = route(req, config, None)
            assert isinstance(decision, RouteDecision)
            res = ledger.place(req, decision, f"t{round_}-{i}", 1.8e9, inventory, topology)
            assert res.decision.kind is Kind.PLACE and res.row is not None
            ids.append(res.row.id)
        for aid in ids:
            ledger.release(aid, ReleaseReason.EXPLICIT, 1.8e9 + 60)
    assert ledger.holders() == {}
    ledger.close()


request_st = st.fixed_dictionaries(
    {
        "project": st.sampled_from(PROJECTS),
        "purpose": st.sampled_from(["training", "inference", "research"]),
        "count": st.integers(1, 4),
        "duration_hours": st.floats(0.1, 6),
        "priority": st.sampled_from(["low", "normal", "high"]),
        "max_wait_minutes": st.one_of(st.none(), st.floats(0, 240)),
    }
)
step_st = st.one_of(
    st.builds(Submit, st.floats(0, 12), st.uuids().map(str), request_st),
    st.builds(SetBudget, st.floats(0, 12), st.sampled_from(PROJECTS), st.floats(0, 200)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(step_st, min_size=1, max_size=10),
    budgets=st.dictionaries(st.sampled_from(PROJECTS), st.floats(5, 300)),
)
def test_random_streams_through_the_graph(steps: list[Step], budgets: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clock = VirtualClock()
        config = small_config(
            monitor={"tick_seconds": 600}, scheduler={"poll_seconds": 600}
        ).model_copy(update={"budgets": budgets})
        orch = Orchestrator(Path(tmp), config, clock=clock)
        try:
            result = run_scenario(orch, clock, steps, lambda *a: None)
            submitted = {s.label for s in steps if isinstance(s, Submit)}
            assert submitted == set(result.outcomes) | (set(result.errors) & submitted)
            for outcome in result.outcomes.values():
                assert outcome.status in (
                    Status.RELEASED,
                    Status.DENIED,
                    Status.TIMED_OUT,
                    Status.PENDING_REVIEW,
                )
            rows = orch.services.ledger.allocations()
            assert all(r.state == "released" for r in rows)
            assert orch.services.ledger.holders() == {}
            history = orch.history()
            started = [r for r in rows if r.started_at is not None]
            assert sorted(h.allocation_id for h in history) == sorted(r.id for r in started)
            for cost in orch.costs():
                if cost.budget_usd is not None:
                    assert cost.spent_usd <= cost.budget_usd + 1e-6
        finally:
            orch.close()

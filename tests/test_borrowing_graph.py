"""Borrowing between pools (fleet.borrowing) through the real graph, on SQLite and PostgreSQL,
in virtual time: a training request with a checkpoint notice runs on the research pool's free
GPUs while its own pool is full; research work arriving reclaims them after the loan's notice,
the loan ends `preempted`, charged once for what it held, and the research request starts at
the yield. Without a notice, or where the fleet does not lend, nothing is borrowed."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.clock import VirtualClock
from fleet.models import ReleaseReason, Status
from graph.scenario import Submit, run_scenario
from tests.conftest import OrchFactory, small_config

NOTICE = 120.0
HOUR = 3600.0


def ask(project: str, purpose: str, count: int, hours: float, **more: Any) -> dict[str, Any]:
    return {
        "project": project,
        "purpose": purpose,
        "count": count,
        "duration_hours": hours,
        "priority": "critical",  # approved without a vote: these tests are about placement
    } | more


FULL = [  # the training pool (8 A100, 2 H100) held for 20 h
    Submit(0.0, "a100", ask("big", "training", 8, 20.0)),
    Submit(0.0, "h100", ask("big", "training", 2, 20.0, gpu_type="H100")),
]


def test_a_loan_runs_now_and_goes_back_after_its_notice(
    make_orch: OrchFactory, database: str
) -> None:
    clock = VirtualClock()
    on_server = {"database": database} if database.startswith("postgresql") else {}
    orch = make_orch(small_config(preemption={"borrow": True}), clock=clock, **on_server)
    start = clock.now()
    result = run_scenario(
        orch,
        clock,
        [
            *FULL,
            Submit(0.1, "loan", ask("vision", "training", 2, 3.0, notice_seconds=NOTICE)),
            Submit(1.0, "owner", ask("lab", "research", 2, 1.0)),
        ],
        lambda *a: None,
    )
    loan, owner = result.outcomes["loan"], result.outcomes["owner"]
    assert loan.route is not None and loan.route.gpu_type == "RTX4090"
    assert loan.route.lent_by == "research" and "borrowed from the research pool" in (
        loan.route.reason
    )
    assert loan.allocation is not None and loan.release is not None
    assert loan.allocation.started_at.timestamp() == pytest.approx(start + 0.1 * HOUR)
    yielded = start + 1.0 * HOUR + NOTICE
    assert loan.release.reason is ReleaseReason.PREEMPTED
    assert loan.release.released_at.timestamp() == pytest.approx(yielded)
    price = orch.services.config.catalog["RTX4090"].price_per_hour
    assert loan.release.cost_usd == pytest.approx(price * 2 * (0.9 + NOTICE / HOUR))
    assert owner.status is Status.RELEASED and owner.allocation is not None
    assert owner.allocation.started_at.timestamp() == pytest.approx(yielded)
    [entry] = [e for e in orch.services.ledger.audit_log() if e.action == "reclaim"]
    assert entry.target == loan.allocation.id and "research pool takes its RTX4090 back" in (
        entry.detail
    )
    charged = orch.services.ledger.query(
        "SELECT count(*) FROM charges WHERE allocation_id=?", (loan.allocation.id,)
    )
    assert charged[0][0] == 1


@pytest.mark.parametrize(
    ("borrow", "notice", "lends"),
    [(True, NOTICE, True), (True, None, False), (False, NOTICE, False)],
    ids=["borrows", "no-notice", "fleet-does-not-lend"],
)
def test_only_work_with_a_notice_borrows_and_only_where_the_fleet_lends(
    make_orch: OrchFactory, borrow: bool, notice: float | None, lends: bool
) -> None:
    orch = make_orch(small_config(preemption={"borrow": borrow}))
    for step in FULL:
        assert orch.request(step.request, wait=False).status is Status.ALLOCATED
    more = {} if notice is None else {"notice_seconds": notice}
    out = orch.request(ask("vision", "training", 2, 3.0, **more), wait=False)
    assert out.route is not None
    if lends:
        assert out.status is Status.ALLOCATED and out.route.gpu_type == "RTX4090"
        assert out.route.lent_by == "research"
    else:
        assert out.status is Status.QUEUED and out.route.lent_by is None
        assert out.route.gpu_type in ("A100", "H100")


def test_a_loan_no_dearer_a_unit_is_taken_though_its_own_pool_is_free(
    make_orch: OrchFactory,
) -> None:
    """Nothing is held: an inference request with a notice borrows a research RTX 4090 ($0.75
    a unit of work, 0.8 an A100) over its own free T4 ($3.51, 0.15), as it finishes sooner
    for less. A training request never borrows the slower card while its own pool can
    start it."""
    orch = make_orch(small_config(preemption={"borrow": True}))
    out = orch.request(ask("serve", "inference", 1, 3.0, notice_seconds=NOTICE), wait=False)
    assert out.status is Status.ALLOCATED and out.route is not None
    assert (out.route.gpu_type, out.route.lent_by) == ("RTX4090", "research")
    assert "sooner than T4 would, for no more a unit of work" in out.route.reason
    train = orch.request(ask("vision", "training", 1, 3.0, notice_seconds=NOTICE), wait=False)
    assert train.route is not None and train.route.lent_by is None


@pytest.mark.parametrize("dearer", [False, True])
def test_a_dearer_loan_only_where_the_fleet_pays_for_speed(
    make_orch: OrchFactory, dearer: bool
) -> None:
    """Nothing is held: a research request with a notice runs on its own RTX 4090 ($0.75 a
    unit of work); with `borrow_dearer` on the training pool's idle H100 ($4.00 a unit, 2.5
    times as fast), and its reason names the price difference."""
    lend = {"borrow": True, "borrow_dearer": dearer}
    orch = make_orch(small_config(preemption=lend))
    out = orch.request(ask("lab", "research", 1, 2.0, notice_seconds=NOTICE), wait=False)
    assert out.status is Status.ALLOCATED and out.route is not None
    if not dearer:
        assert (out.route.gpu_type, out.route.lent_by) == ("RTX4090", None)
        return
    assert (out.route.gpu_type, out.route.lent_by) == ("H100", "training")
    assert "sooner than RTX4090 would, for $3.25 more a unit of work (borrow_dearer)" in (
        out.route.reason
    )
    assert out.route.est_hours == pytest.approx(2.0 * 0.8 / 2.0)


@pytest.mark.parametrize(("budget", "gpu_type"), [(10.0, "H100"), (5.0, "RTX4090")])
def test_a_dearer_loan_only_where_the_budget_pays_its_whole_lease(
    make_orch: OrchFactory, budget: float, gpu_type: str
) -> None:
    """With `borrow_dearer`, 2 h of research ($1.20 on its RTX 4090; 0.8 h for $6.40 on an
    idle H100): a $10 budget takes the H100; a $5 one would lease the H100 only part of the
    way, ending before the work, so the request stays on its own card."""
    orch = make_orch(small_config(preemption={"borrow": True, "borrow_dearer": True}))
    orch.services.ledger.set_budget("lab", budget, orch.services.clock.now())
    out = orch.request(ask("lab", "research", 1, 2.0, notice_seconds=NOTICE), wait=False)
    assert out.status is Status.ALLOCATED and out.route is not None
    assert out.route.gpu_type == gpu_type and out.route.asked_hours is None


@pytest.mark.parametrize("policy", ["max-min", "least-attained"])
def test_under_a_levelling_policy_a_full_pool_borrows_too(
    make_orch: OrchFactory, policy: str
) -> None:
    """Levelling with borrowing, the training pool full: the request borrows the research
    pool's free RTX 4090s, as under fair-share, rather than wait in its own line for
    preemption to make room after the runners' minimum run."""
    config = small_config(scheduler={"policy": policy}, preemption={"borrow": True})
    orch = make_orch(config)
    for step in FULL:
        assert orch.request(step.request, wait=False).status is Status.ALLOCATED
    out = orch.request(ask("vision", "training", 2, 3.0, notice_seconds=NOTICE), wait=False)
    assert out.status is Status.ALLOCATED and out.route is not None
    assert (out.route.gpu_type, out.route.lent_by) == ("RTX4090", "research")
    assert "it finishes sooner than waiting for its own" in out.route.reason

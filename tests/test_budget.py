"""Deadlines under a lowered budget: spend reaches the budget exactly, never more."""

from __future__ import annotations

import pytest

from fleet.budget import Active, Running, accrued, cut_deadlines


def test_enough_budget_keeps_leases() -> None:
    items = [Running("a", 1.0, 0.0, 100.0)]
    assert cut_deadlines(items, 100.0, now=10.0) == {"a": 100.0}


def test_common_cut_time() -> None:
    items = [Running("a", 1.0, 0.0, 100.0), Running("b", 2.0, 10.0, 100.0)]
    deadlines = cut_deadlines(items, 70.0, now=20.0)
    # a + b accrue 1*(T-0) + 2*(T-10) = 70  ->  T = 30
    assert deadlines == {"a": pytest.approx(30.0), "b": pytest.approx(30.0)}
    assert accrued(
        [Running(i.id, i.rate_usd_per_s, i.started_at, deadlines[i.id]) for i in items], 1e9
    ) == pytest.approx(70.0)


def test_cut_past_an_earlier_lease_end() -> None:
    items = [Running("a", 1.0, 0.0, 20.0), Running("b", 1.0, 0.0, 100.0)]
    deadlines = cut_deadlines(items, 50.0, now=5.0)
    # until 20 both accrue (40); then b alone: 40 + (T - 20) = 50 -> T = 30
    assert deadlines["a"] == 20.0 and deadlines["b"] == pytest.approx(30.0)


def test_already_at_budget_ends_now() -> None:
    items = [Running("a", 1.0, 0.0, 100.0)]
    assert cut_deadlines(items, 10.0, now=10.0) == {"a": pytest.approx(10.0)}


def test_a_later_start_is_a_breakpoint() -> None:
    """b starts (at 50) after the spend reaches the budget (at 40): it ends as it starts, and
    a alone sets the cut (not both, as if b accrued from now)."""
    items = [Running("a", 1.0, 0.0, 100.0), Running("b", 1.0, 50.0, 100.0)]
    deadlines = cut_deadlines(items, 40.0, now=10.0)
    assert deadlines == {"a": pytest.approx(40.0), "b": 50.0}


def test_a_passed_deadline_stays_and_the_rest_may_run_to_their_lease() -> None:
    """What the ledger hands cut_deadlines: an allocation past its deadline is being released
    there; one still running may go back to its lease end."""
    due = Active("a", 1.0, 0.0, lease_end=100.0, deadline=20.0)
    running = Active("b", 1.0, 0.0, lease_end=100.0, deadline=40.0)
    items = [due.running(30.0), running.running(30.0)]
    assert cut_deadlines(items, 200.0, now=30.0) == {"a": 20.0, "b": 100.0}
    assert cut_deadlines(items, 70.0, now=30.0) == {"a": 20.0, "b": pytest.approx(50.0)}

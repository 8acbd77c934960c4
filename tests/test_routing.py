"""Routing: cost per unit of work, performance mode, alternatives, and refusals."""

from __future__ import annotations

import pytest

from fleet.config import FleetConfig
from fleet.models import GPURequest, RouteMode
from fleet.routing import Refusal, estimate, lease_hours, route


def r(**fields: object) -> GPURequest:
    base: dict[str, object] = {
        "project": "p",
        "purpose": "training",
        "count": 2,
        "duration_hours": 4,
    }
    return GPURequest.model_validate(base | fields)


def test_faster_card_wins_when_it_finishes_sooner(config: FleetConfig) -> None:
    decision = route(r(), config, None)
    assert not isinstance(decision, Refusal)
    # 4 h on an A100 is 2 h on an H100: 2 x 8.00 x 2 = 32 < 2 x 5.12 x 4 = 40.96
    assert decision.gpu_type == "H100"
    assert decision.est_hours == pytest.approx(2.0)
    assert decision.est_cost_usd == pytest.approx(32.0)
    [alt] = decision.alternatives
    assert alt.gpu_type == "A100" and alt.est_cost_usd == pytest.approx(40.96) and alt.feasible
    # the 2 h are priced; the lease is the 4 h asked: a speed is an estimate, pauses are not
    assert lease_hours(decision, r()) == 4.0


def test_a_lease_is_the_hours_asked_the_work_on_a_slower_type_or_what_the_budget_buys(
    config: FleetConfig,
) -> None:
    """Never shorter than asked on a faster type; as long as the work takes on a slower one
    (4 h of H100 work on an A100: 8 h); where the budget shortened it, what it buys."""
    slow = route(r(gpu_type=None, mode="budget", duration_hours=4), config, None)
    assert not isinstance(slow, Refusal)
    on_a100 = slow.model_copy(update={"gpu_type": "A100", "est_hours": 8.0})
    assert lease_hours(on_a100, r()) == 8.0
    cut = slow.model_copy(update={"est_hours": 1.5, "asked_hours": 2.0})
    assert lease_hours(cut, r()) == 1.5


def test_cheaper_card_wins_when_speed_does_not_pay(config: FleetConfig) -> None:
    slow_h100 = config.model_copy(
        update={
            "catalog": config.catalog
            | {"H100": config.catalog["H100"].model_copy(update={"relative_throughput": 1.2})}
        }
    )
    decision = route(r(), slow_h100, None)
    assert not isinstance(decision, Refusal) and decision.gpu_type == "A100"


def test_performance_mode_takes_fastest_within_budget(config: FleetConfig) -> None:
    decision = route(r(mode=RouteMode.PERFORMANCE, budget_limit=100), config, None)
    assert not isinstance(decision, Refusal) and decision.gpu_type == "H100"


def test_named_type_is_honoured(config: FleetConfig) -> None:
    decision = route(r(gpu_type="A100", budget_limit=50), config, None)
    assert not isinstance(decision, Refusal)
    assert decision.gpu_type == "A100" and decision.est_cost_usd == pytest.approx(40.96)


def test_over_budget_named_type_is_offered_a_cheaper_one(config: FleetConfig) -> None:
    decision = route(r(gpu_type="A100", budget_limit=35), config, None)
    assert isinstance(decision, Refusal)
    assert "request budget" in decision.reason and "--gpu-type H100" in decision.reason


def test_project_budget_refuses(config: FleetConfig) -> None:
    decision = route(r(), config, 10.0)  # $32 on H100s: not even half of the lease fits $10
    assert isinstance(decision, Refusal) and "remaining" in decision.reason
    assert "even for 50% of the lease" in decision.reason


def test_project_budget_shortens_a_lease_it_cannot_take_whole(config: FleetConfig) -> None:
    """$20 buys 1.25 of the 2 H100 hours: the lease is shortened, and the type is still the
    cheapest per unit of work, not the one whose shortened lease happens to cost least."""
    decision = route(r(), config, 20.0)
    assert not isinstance(decision, Refusal) and decision.gpu_type == "H100"
    assert decision.est_hours == pytest.approx(1.25) and decision.asked_hours == 2.0
    assert decision.est_cost_usd == pytest.approx(20.0)
    assert "budget shortens the 2.00 h lease" in decision.reason
    never = config.model_copy(
        update={"limits": config.limits.model_copy(update={"min_lease_share": 1.0})}
    )
    assert isinstance(route(r(), never, 20.0), Refusal)


def test_memory_filters_types(config: FleetConfig) -> None:
    decision = route(r(purpose="research", min_memory_gb=20, count=1), config, None)
    assert not isinstance(decision, Refusal) and decision.gpu_type == "RTX4090"


def test_estimate_scales_by_throughput(config: FleetConfig) -> None:
    hours, cost = estimate(r(purpose="inference", count=1, duration_hours=3), config, "T4")
    assert hours == pytest.approx(3) and cost == pytest.approx(3 * 0.526)


def test_a_full_cheap_type_does_not_make_a_request_wait(config: FleetConfig) -> None:
    """H100 is cheaper per unit of work but full: the A100s that are free now take it; with
    no A100 free either, the request queues for the cheapest, H100."""
    decision = route(r(), config, None, starts_in={"H100": 50.0, "A100": 0.0})
    assert not isinstance(decision, Refusal) and decision.gpu_type == "A100"
    assert "H100 is full" in decision.reason
    decision = route(r(), config, None, starts_in={"H100": 1.0, "A100": 2.0})
    assert not isinstance(decision, Refusal) and decision.gpu_type == "H100"
    decision = route(r(type="H100"), config, None, starts_in={"H100": 9.0, "A100": 0.0})
    assert not isinstance(decision, Refusal) and decision.gpu_type == "H100"  # named: kept


def test_a_cheaper_type_that_frees_in_time_is_worth_the_wait(config: FleetConfig) -> None:
    """10 h of A100 work is 5 h on an H100 (cheaper per unit of work). Waiting up to the 5 h
    it saves still finishes no later than the free A100s would; a project expected to hold
    half its lease saves only 2.5 h, so it waits at most that long."""
    request = r(duration_hours=10)
    for wait, share, chosen in (
        (4.9, 1.0, "H100"),
        (5.1, 1.0, "A100"),
        (2.4, 0.5, "H100"),
        (2.6, 0.5, "A100"),
    ):
        decision = route(
            request, config, None, starts_in={"H100": wait, "A100": 0.0}, used_share=share
        )
        assert not isinstance(decision, Refusal) and decision.gpu_type == chosen, (wait, share)
        if chosen == "H100":
            assert "finishes before A100 started now would" in decision.reason

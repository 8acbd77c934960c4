"""Approval with guardrails: the band it is voted in, what it carries, and that the monitor
and routing enforce it."""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from council.features import routed
from council.guardrails import guardrails
from council.outcomes import banded
from council.policies import approve_all
from council.voting import combine
from fleet.clock import VirtualClock, sleep_until
from fleet.commands import Commands
from fleet.config import CouncilSettings, MonitorSettings, parse_fleet
from fleet.errors import InvalidInput
from fleet.models import (
    Allocation,
    CouncilOutcome,
    EventKind,
    GPURequest,
    Guardrails,
    MemberVote,
    MonitorState,
    Purpose,
    ReleaseReason,
    RouteDecision,
    RouteMode,
    Status,
    Verdict,
    utc,
)
from fleet.monitoring import IdlePolicy, idle_limit_s, renews
from fleet.monitors import new_owner
from fleet.routing import guarded
from graph.cli_ledger import why_then
from graph.outcome import lease_note
from graph.status import fleet_status
from graph.tools import gpu_tools
from nodes.audit import recorded
from nodes.monitor import _policy
from nodes.review import parse_decision
from nodes.state import State
from sim.agent_replay import run_gpu_agent
from sim.workload import Phase, Workload
from tests.conftest import ROOT, OrchFactory, fleet_toml, run_cli, small_config
from tests.test_council_cfc import features
from tests.test_simulate import TINY_FLEET, held_s, job

RANK = {
    CouncilOutcome.DENIED: 0,
    CouncilOutcome.SPLIT: 1,
    CouncilOutcome.GUARDED: 2,
    CouncilOutcome.APPROVED: 3,
}
S = CouncilSettings(policy="reference", guard_share=0.5)  # deny 0.4, guard 0.5, approve 0.6


def votes(p: float, approvers: int = 4) -> list[MemberVote]:
    """Four members at probability `p`, the first `approvers` approving outright."""
    return [
        MemberVote(
            member=f"m{i}",
            verdict=Verdict.APPROVE if i < approvers else Verdict.ABSTAIN,
            probability=p,
        )
        for i in range(4)
    ]


def test_the_four_decisions_by_probability() -> None:
    assert S.band() == (0.4, 0.6) and S.guard() == pytest.approx(0.5)
    decided = {p: combine(votes(p), S, "t") for p in (0.3, 0.45, 0.52, 0.58, 0.7)}
    assert [d.outcome for d in decided.values()] == [
        CouncilOutcome.DENIED,
        CouncilOutcome.SPLIT,
        CouncilOutcome.GUARDED,
        CouncilOutcome.GUARDED,
        CouncilOutcome.APPROVED,
    ]
    assert decided[0.3].guardrails is None and decided[0.7].guardrails is None
    low, high = decided[0.52].guardrails, decided[0.58].guardrails
    assert low is not None and high is not None
    assert low.idle_minutes == high.idle_minutes == S.guard_idle_minutes
    assert low.cheaper_type and not high.cheaper_type  # more predicted waste, more guardrails
    assert low.predicted_waste == pytest.approx(0.48)
    assert decided[0.52].summary.startswith("approved with guardrails at p=0.52: `gpu-agent run`")
    # a human is shown what approval would carry
    split = decided[0.45].guardrails
    assert split is not None and split.cheaper_type


def test_without_a_quorum_a_confident_council_approves_with_guardrails() -> None:
    d = combine(votes(0.9, approvers=2), S, "t")
    assert d.outcome is CouncilOutcome.GUARDED and "no quorum: 2 of 4" in d.summary
    # with no guarded band (the default), the quorum still sends it to a human
    closed = S.model_copy(update={"guard_share": None})
    assert closed.guard() == 0.6
    assert combine(votes(0.9, approvers=2), closed, "t").outcome is CouncilOutcome.SPLIT
    assert combine(votes(0.55), closed, "t").outcome is CouncilOutcome.SPLIT


def test_more_waste_evidence_never_buys_a_kinder_decision() -> None:
    """Monotone in the probability and in the number of approvers, over a fine grid."""
    for approvers in range(5):
        ranks = [RANK[combine(votes(i / 200, approvers), S, "t").outcome] for i in range(1, 200)]
        assert ranks == sorted(ranks)
    for i in range(1, 200):
        ranks = [RANK[combine(votes(i / 200, a), S, "t").outcome] for a in range(5)]
        assert ranks == sorted(ranks)


def test_a_fleet_without_auto_deny_asks_a_human_where_the_council_would_deny() -> None:
    """`auto_deny = false`: at or below the deny threshold a human decides (the simulated
    reviewer then approves, with the guardrails the council shows); the rest of the band is
    as before, and still monotone."""
    human = S.model_copy(update={"auto_deny": False})
    low = combine(votes(0.3), human, "t")
    assert low.outcome is CouncilOutcome.SPLIT
    assert low.guardrails is not None and low.guardrails.cheaper_type
    assert low.summary.startswith("below the deny threshold at p=0.30: a human decides")
    assert combine(votes(0.3), S, "t").outcome is CouncilOutcome.DENIED
    for p in (0.45, 0.52, 0.7):
        assert combine(votes(p), human, "t").outcome is combine(votes(p), S, "t").outcome
    for approvers in range(5):
        ranks = [RANK[combine(votes(i / 200, approvers), human, "t").outcome] for i in range(200)]
        assert ranks == sorted(ranks) and RANK[CouncilOutcome.DENIED] not in ranks
    assert banded(0.1, 0.2, 0.8, "t", auto_deny=False).outcome is CouncilOutcome.SPLIT
    assert banded(0.1, 0.2, 0.8, "t").outcome is CouncilOutcome.DENIED


SIZED = S.model_copy(update={"guard_gpu_hours": 8.0})  # guardrails where 8 GPU-hours at risk


def test_by_gpu_hours_at_risk_a_large_request_is_guarded_and_a_small_one_is_not() -> None:
    """From the guard threshold up, (1 - p) x the GPU-hours asked decides, not the approve
    threshold: the same probability guards 64 GPU-hours and approves 4 plainly."""
    big = combine(votes(0.7), SIZED, "t", gpu_hours=64.0)  # 19.2 GPU-hours at risk
    small = combine(votes(0.52), SIZED, "t", gpu_hours=4.0)  # 1.9
    assert big.outcome is CouncilOutcome.GUARDED and big.guardrails is not None
    assert big.summary.endswith("19.2 GPU-hours at risk")
    assert big.guardrails.at_risk_gpu_hours == pytest.approx(19.2)
    assert small.outcome is CouncilOutcome.APPROVED and small.guardrails is None
    assert "1.9 GPU-hours at risk, too few to guard" in small.summary
    # the band below the guard threshold is as before: a human, then a denial
    assert combine(votes(0.45), SIZED, "t", gpu_hours=1.0).outcome is CouncilOutcome.SPLIT
    assert combine(votes(0.3), SIZED, "t", gpu_hours=1.0).outcome is CouncilOutcome.DENIED
    # a plain approval still needs its quorum
    assert combine(votes(0.9, 2), SIZED, "t", gpu_hours=1.0).outcome is CouncilOutcome.GUARDED
    # without the request's size, or without the setting, the probability alone decides
    assert combine(votes(0.7), SIZED, "t").outcome is CouncilOutcome.APPROVED
    assert combine(votes(0.7), S, "t", gpu_hours=64.0).outcome is CouncilOutcome.APPROVED


def test_guarding_by_gpu_hours_stays_monotone() -> None:
    """More waste evidence or a larger request never buys a kinder decision."""
    for hours in (0.5, 8.0, 40.0, 1000.0):
        for approvers in range(5):
            ranks = [
                RANK[combine(votes(i / 200, approvers), SIZED, "t", gpu_hours=hours).outcome]
                for i in range(1, 200)
            ]
            assert ranks == sorted(ranks)
    for i in range(1, 200):
        ranks = [
            RANK[combine(votes(i / 200), SIZED, "t", gpu_hours=h).outcome]
            for h in (1000.0, 100.0, 20.0, 4.0, 1.0)
        ]
        assert ranks == sorted(ranks)


def test_no_council_guards_by_size_alone_where_the_fleet_asks() -> None:
    f = features(random.Random(0), count=8, hours=4.0)  # 32 GPU-hours, 16 at risk at even odds
    assert approve_all(f, S).outcome is CouncilOutcome.APPROVED
    guarded_by_size = approve_all(f, SIZED)
    assert guarded_by_size.outcome is CouncilOutcome.GUARDED
    assert guarded_by_size.guardrails is not None and not guarded_by_size.guardrails.cheaper_type
    assert guarded_by_size.guardrails.at_risk_gpu_hours == 16.0
    small = approve_all(features(random.Random(0), count=2, hours=4.0), SIZED)  # 4 at risk
    assert small.outcome is CouncilOutcome.APPROVED and small.guardrails is None
    # the fleet's other guardrails come with them: its term and its stream
    more = SIZED.model_copy(update={"guard_lease_hours": 2.0, "guard_idle_release": "stream"})
    rails = approve_all(f, more).guardrails
    assert rails is not None and rails.lease_hours == 2.0 and rails.idle_stream
    assert not rails.cheaper_type


@pytest.mark.parametrize("hours", [0.0, -1.0, float("inf"), float("nan"), True])
def test_guard_gpu_hours_must_be_a_positive_number(hours: float) -> None:
    with pytest.raises(ValidationError, match="guard_gpu_hours"):
        CouncilSettings(guard_share=0.5, guard_gpu_hours=hours)


def test_guard_gpu_hours_needs_a_guarded_band() -> None:
    with pytest.raises(ValidationError, match="guard_gpu_hours needs guard_share"):
        CouncilSettings(guard_gpu_hours=8.0)
    assert CouncilSettings(guard_share=0.5, guard_gpu_hours=8).guard_gpu_hours == 8.0


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5, float("nan"), True])
def test_a_guard_share_outside_the_band_is_refused(share: float) -> None:
    with pytest.raises(ValidationError, match="guard_share"):
        CouncilSettings(guard_share=share)


@pytest.mark.parametrize("minutes", [0.0, -1.0, float("inf"), float("nan")])
def test_a_guard_idle_limit_must_be_a_positive_number(minutes: float) -> None:
    with pytest.raises(ValidationError, match="guard_idle_minutes"):
        CouncilSettings(guard_idle_minutes=minutes)


def test_the_cheaper_type_guardrail_routes_by_price_unless_a_type_is_named() -> None:
    """What the route node and the review page's "if approved now" both route."""
    fast = GPURequest(project="p", count=2, duration_hours=4, mode="performance")
    rails = Guardrails(predicted_waste=0.4, idle_minutes=10, cheaper_type=True)
    assert guarded(fast, rails).mode is RouteMode.BUDGET
    assert guarded(fast, rails.model_copy(update={"cheaper_type": False})) is fast
    assert guarded(fast, None) is fast
    named = fast.model_copy(update={"gpu_type": "H100"})
    assert guarded(named, rails).gpu_type == "H100"  # the named type stays its choice


def test_the_guarded_band_follows_a_band_set_after_validation() -> None:
    """A neural council's trained band replaces deny and approve without validation; the
    share places the guard inside it."""
    moved = CouncilSettings(guard_share=0.5).model_copy(
        update={"deny_threshold": 0.6, "approve_threshold": 0.9}
    )
    assert moved.guard() == pytest.approx(0.75)
    assert guardrails(0.7, moved).cheaper_type  # below the middle of 0.75 .. 0.9


def test_the_guardrail_shortens_the_idle_timeout_only_where_no_command_runs() -> None:
    m = MonitorSettings()
    assert idle_limit_s(m, IdlePolicy(Purpose.TRAINING), 0.0) == 30 * 60
    assert idle_limit_s(m, IdlePolicy(Purpose.TRAINING, guard_minutes=10), 0.0) == 10 * 60
    # a pause the work already came back from still stretches it: no work is cut short
    assert idle_limit_s(m, IdlePolicy(Purpose.TRAINING, guard_minutes=10), 20 * 60) == 30 * 60
    assert idle_limit_s(m, IdlePolicy(Purpose.TRAINING, "running", 10), 0.0) == float("inf")


GUARDED_FLEET: dict[str, Any] = {
    "policy": "reference",
    "deny_threshold": 0.01,
    "guard_share": 0.85,  # guard at 0.85: the reference council gives this request p=0.91
    "approve_threshold": 0.999,
    "auto_approve_max_gpus": 0,
}


def test_a_guarded_allocation_is_released_at_the_guardrails_idle_limit(
    make_orch: OrchFactory,
) -> None:
    orch = make_orch(
        small_config(council=GUARDED_FLEET, simulation={"workloads": {"lazy": "hoard"}})
    )
    request = {
        "project": "lazy",
        "purpose": "training",
        "count": 2,
        "duration_hours": 4,
        "mode": "performance",
    }
    out = orch.request(request)
    assert out.council is not None and out.council.outcome is CouncilOutcome.GUARDED
    rails = out.council.guardrails
    assert rails is not None and rails.cheaper_type
    assert out.status is Status.RELEASED and out.release is not None
    assert out.release.reason is ReleaseReason.IDLE
    assert out.allocation is not None
    held = out.release.released_at - out.allocation.started_at
    assert held.total_seconds() <= rails.idle_minutes * 60 + small_config().monitor.tick_seconds
    # routed by price per unit of work although it asked for speed, and says why
    assert out.route is not None and out.route.mode.value == "budget"
    assert "guardrail" in out.route.reason
    plain = make_orch(small_config(simulation={"workloads": {"lazy": "hoard"}}), name="plain")
    unguarded = plain.request(request)
    assert unguarded.release is not None and unguarded.allocation is not None
    assert unguarded.release.released_at - unguarded.allocation.started_at > held


def test_work_an_idle_release_ended_is_spared_the_guardrails_idle_limit_when_it_resumes(
    make_orch: OrchFactory,
) -> None:
    """The work a guarded allocation's idle release ended asks again three minutes later (its
    request `resumes` that allocation; a 13-minute pause, which stretches no limit past 19.5
    minutes): the council guards it again, but the monitor holds it to the purpose's idle
    timeout, not the guardrail's, so a pause that cost the work once does not cost it
    twice."""
    clock = VirtualClock()
    council = GUARDED_FLEET | {"guard_share": 0.5}  # its record now shows an idle release
    config = small_config(council=council, simulation={"workloads": {"lazy": "hoard"}})
    orch = make_orch(config, clock=clock)
    request = {"project": "lazy", "purpose": "training", "count": 2, "duration_hours": 4}
    first = orch.request(request)
    assert first.allocation is not None and first.release is not None
    assert first.release.reason is ReleaseReason.IDLE
    sleep_until(clock, clock.now() + 180)
    again = orch.request(request | {"resumes": first.allocation.id})
    assert again.council is not None and again.council.outcome is CouncilOutcome.GUARDED
    assert again.release is not None and again.allocation is not None
    assert again.release.reason is ReleaseReason.IDLE
    held = (again.release.released_at - again.allocation.started_at).total_seconds()
    timeout = config.monitor.idle_timeout_by_purpose.get(
        Purpose.TRAINING, config.monitor.idle_timeout_minutes
    )
    assert held >= timeout * 60 > config.monitor.pause_factor * 13 * 60


def test_the_cli_shows_the_guardrails_an_approval_carries(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(council=GUARDED_FLEET))
    done = run_cli(
        "request",
        *("--project", "vision", "--purpose", "training", "--count", "2", "--hours", "1"),
        *("--mode", "performance", "--no-wait"),
        *("--state-dir", str(tmp_path / "s"), "--fleet", str(fleet)),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "guardrails (approved): `gpu-agent run` required (else idle release after 10 min); "
        "the cheapest type per unit of "
        "work; predicted to end wasteful: " in done.stdout
    ), done.stdout


def test_a_fleet_that_guards_by_gpu_hours_at_risk_spares_the_small_request(
    tmp_path: Path,
) -> None:
    """`guard_gpu_hours` in the fleet file reaches the council in the graph: at the same
    band, 2 GPU-hours asked go without guardrails and 40 carry them."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(council=GUARDED_FLEET | {"guard_share": 0.5, "guard_gpu_hours": 1}))
    where = ("--state-dir", str(tmp_path / "s"), "--fleet", str(fleet), "--no-wait", "--json")
    council = {}
    for hours in ("1", "20"):
        done = run_cli(
            "request",
            *("--project", "vision", "--purpose", "training", "--count", "2", "--hours", hours),
            *where,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        council[hours] = json.loads(done.stdout)["council"]
    assert council["1"]["outcome"] == "approved" and council["1"]["guardrails"] is None
    assert council["1"]["summary"].endswith("GPU-hours at risk, too few to guard")
    assert council["20"]["outcome"] == "approved_with_guardrails"
    assert council["20"]["summary"].endswith("GPU-hours at risk")
    at_risk = council["20"]["guardrails"]["at_risk_gpu_hours"]
    assert at_risk == pytest.approx((1 - council["20"]["probability"]) * 40)
    shown = run_cli(  # the CLI shows what the guardrails are there for
        "request",
        *("--project", "vision", "--purpose", "training", "--count", "2", "--hours", "20"),
        *where[:-1],
        cwd=ROOT,
    )
    assert shown.returncode == 0, shown.stderr
    outlook = r"guardrails \(approved\): .*predicted to end wasteful: \d+% \([\d.]+ GPU-h\)"
    assert re.search(outlook, shown.stdout), shown.stdout


def test_the_cli_approves_without_the_guardrails_only_when_asked(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(council=GUARDED_FLEET | {"guard_share": 0.95}))
    where = ("--state-dir", str(tmp_path / "s"), "--fleet", str(fleet))
    done = run_cli(
        "request",
        *("--project", "vision", "--purpose", "training", "--count", "2", "--hours", "1"),
        *("--mode", "performance", "--thread-id", "t1", *where),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "guardrails (if approved): " in done.stdout
    assert "gpu-agent resume t1 --approve [--without-guardrails] (or --deny)" in done.stdout
    bad = run_cli("resume", "t1", "--deny", "--without-guardrails", *where, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--without-guardrails goes with --approve" in bad.stderr
    done = run_cli(
        "resume", "t1", "--approve", "--without-guardrails", "--no-wait", *where, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "guardrails (dropped by cli): " in done.stdout, done.stdout


def test_the_council_prices_the_whole_lease_the_route_would_take() -> None:
    """A budget that shortens the lease to 2.75 h does not make the request look cheaper to
    the council: it is priced on the 10 h asked, on the routed type."""
    route = RouteDecision(
        gpu_type="A100",
        pool=Purpose.TRAINING,
        mode=RouteMode.BUDGET,
        price_per_hour=4.0,
        est_hours=2.75,
        est_cost_usd=11.0,
        reason="cheapest",
        asked_hours=10.0,
    )
    priced = routed(route, 1)
    assert (priced.gpu_type, priced.hours, priced.cost_usd) == ("A100", 10.0, 40.0)
    assert priced.describe() == "1 x A100 at $4.00/GPU-h for 10.00 h"


def test_a_human_may_approve_without_the_guardrails(make_orch: OrchFactory) -> None:
    """A split the council would guard: approved as shown, the allocation runs under the
    guardrails; approved without them, as asked (performance mode, the fleet's idle
    timeout), and the audit log, the event and the outcome say who dropped them."""
    split = GUARDED_FLEET | {"guard_share": 0.95}  # guard at 0.95 > p = 0.91: a human's
    orch = make_orch(small_config(council=split, simulation={"workloads": {"lazy": "hoard"}}))
    request = {
        "project": "lazy",
        "purpose": "training",
        "count": 2,
        "duration_hours": 4,
        "mode": "performance",
    }
    kept, dropped = (orch.request(request, thread_id=t) for t in ("kept", "dropped"))
    for out in (kept, dropped):
        assert out.status is Status.PENDING_REVIEW and out.council is not None
        assert out.guardrails() == ("if approved", out.council.guardrails)
    kept = orch.resume("kept", {"approve": True, "by": "ann"})
    dropped = orch.resume("dropped", {"approve": True, "by": "bob", "guardrails": False})
    assert kept.route is not None and kept.route.mode is RouteMode.BUDGET
    assert dropped.route is not None and dropped.route.mode is RouteMode.PERFORMANCE
    assert "guardrail" not in dropped.route.reason
    rails = dropped.council.guardrails if dropped.council else None
    assert rails is not None and dropped.guardrails() == ("dropped by bob", rails)
    assert kept.guardrails() == ("approved", rails)
    held = []
    for out in (kept, dropped):
        assert out.release is not None and out.release.reason is ReleaseReason.IDLE
        assert out.allocation is not None
        held.append(out.release.released_at - out.allocation.started_at)
    assert held[0].total_seconds() <= rails.idle_minutes * 60 + small_config().monitor.tick_seconds
    assert held[1] > held[0]
    assert any("bob approved without the council's guardrails" in e.message for e in dropped.events)
    decided = {
        e.who: recorded(e) for e in orch.services.ledger.audit_log("lazy") if e.action == "approve"
    }
    assert decided["bob"].guardrails is False and decided["ann"].guardrails is True
    with pytest.raises(InvalidInput):
        parse_decision({"approve": True, "guardrails": "no"})


LEASED_FLEET = GUARDED_FLEET | {"guard_lease_hours": 1.0}


def test_a_guard_lease_needs_a_guarded_band_and_at_least_a_quarter_hour() -> None:
    assert CouncilSettings(guard_share=0.5, guard_lease_hours=2.0).guard_lease_hours == 2.0
    with pytest.raises(ValidationError, match="guard_lease_hours needs guard_share"):
        CouncilSettings(guard_lease_hours=2.0)
    for hours in (0.1, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValidationError):
            CouncilSettings(guard_share=0.5, guard_lease_hours=hours)


def test_a_term_is_renewed_unless_its_gpus_sat_idle_all_of_it_and_past_any_pause() -> None:
    m = MonitorSettings()  # a 60 s tick, pause factor 1.5
    began, now = 0.0, 3540.0  # a 1 h term, decided a tick before its end
    assert renews(MonitorState(), m, now, began)  # it works
    idle = MonitorState(idle_since=utc(began + 60))  # idle from the term's first tick
    assert not renews(idle, m, now, began)
    # a real clock's first tick lands a moment late: still idle from the first tick (a strict
    # comparison renewed such a term as worked, so a hung command held two terms)
    assert not renews(MonitorState(idle_since=utc(began + 60.001)), m, now, began)
    assert not renews(MonitorState(idle_since=utc(began + 89)), m, now, began)
    assert renews(MonitorState(idle_since=utc(began + 120)), m, now, began)  # it worked
    came_back = idle.model_copy(update={"longest_pause_s": 2400.0})  # 40 min x 1.5 > 58 min
    assert renews(came_back, m, now, began)
    assert renews(idle.model_copy(update={"works_while_idle": True}), m, now, began)
    assert renews(idle.model_copy(update={"guard_spared": True}), m, now, began)


def lease_events(out: Any) -> list[str]:
    return [e.message for e in out.events if e.kind is EventKind.LEASE]


def test_a_guarded_lease_is_renewed_a_term_at_a_time_while_its_gpus_work(
    make_orch: OrchFactory,
) -> None:
    """6 hours asked on the reference type (3 h of work on the H100 the cheaper-type guardrail
    routes it to, but a lease is never shorter than asked: fleet.routing.lease_hours), a
    1-hour term: the GPUs train throughout, so the monitor renews it five times, each a tick
    before the term ends, and it ends at the lease asked, charged once for the whole; the
    audit log says who renewed it and why."""
    orch = make_orch(small_config(council=LEASED_FLEET))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 6}
    out = orch.request(request)
    assert out.council is not None and out.council.outcome is CouncilOutcome.GUARDED
    rails = out.council.guardrails
    assert rails is not None and rails.lease_hours == 1.0
    assert "a 1 h lease, renewed while its GPUs work" in rails.describe()
    assert out.allocation is not None and out.release is not None
    assert out.release.reason is ReleaseReason.LEASE_EXPIRED
    assert out.release.hours == pytest.approx(6.0)
    assert out.allocation.lease_end == out.release.released_at  # the thread's, renewed
    assert lease_note(out) == (
        "held 1 h at a time, renewed while its GPUs work, up to 6.00 h (the council's guardrails)"
    )
    placed = next(e.message for e in out.events if e.kind is EventKind.PLACED)
    assert "until 2026-01-01 01:00 UTC, renewed while its GPUs work, up to 6.00 h" in placed
    renewed = lease_events(out)
    assert renewed == [
        f"lease renewed to 2026-01-01 0{h}:00:00 UTC: its GPUs work" for h in range(2, 7)
    ]
    assert [e.at.minute for e in out.events if e.kind is EventKind.LEASE] == [59] * 5
    ledger = orch.services.ledger
    row = ledger.get(out.allocation.id)
    assert row.started_at is not None and row.hours == 6.0
    assert row.lease_end == pytest.approx(row.started_at + 6 * 3600)
    assert ledger.query("SELECT renew_hours FROM allocations")[0][0] is None  # the last term
    audit = [e for e in ledger.audit_log("vision") if e.action == "renew"]
    assert len(audit) == 5 and {e.who for e in audit} == {"gpu-agent"}
    assert out.cost_usd == pytest.approx(row.price_per_hour * 2 * 6.0)


def test_status_says_a_lease_is_held_a_term_at_a_time_and_to_when(
    make_orch: OrchFactory,
) -> None:
    """`status` showed only the term's end, as if the lease ended there: now its JSON and
    text say the term and the end of the lease asked, which renewals reach."""
    orch = make_orch(small_config(council=LEASED_FLEET))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 6}
    out = orch.request(request, wait=False)
    assert out.allocation is not None
    (live,) = [a for a in fleet_status(orch.services)["allocations"] if a["state"] == "active"]
    assert (live["term_hours"], live["deadline_reason"]) == (1.0, "lease-expired")
    assert live["deadline"] == "2026-01-01T01:00:00+00:00"
    assert live["lease_asked_end"] == "2026-01-01T06:00:00+00:00"
    assert why_then(live) == (
        " (a 1 h term, renewed while its GPUs work up to 2026-01-01T06:00:00+00:00)"
    )
    whole = {"term_hours": None, "deadline_reason": "lease-expired"}
    assert why_then(whole) == "" and why_then(whole | {"deadline_reason": "budget"}) == " (budget)"


def test_a_hung_command_loses_its_gpus_at_the_end_of_a_term_they_sat_idle(
    make_orch: OrchFactory,
) -> None:
    """Under a running `gpu-agent run` command an idle spell never releases the GPUs (it may
    be a pause); a guarded lease is still not renewed where every GPU has been idle all its
    term, so a command that hangs holds them 1 hour, not the 8 asked (on the reference type;
    the H100 both are routed to leases them as long). Unguarded, the same request holds them to its
    lease's end; so does the request that resumes the work a term ended (its idleness
    misled once: it is not judged by it again)."""
    config = small_config(council=LEASED_FLEET, simulation={"workloads": {"lazy": "hoard"}})
    request = {"project": "lazy", "purpose": "training", "count": 2, "duration_hours": 8}
    held = {}
    for name, fleet in (("guarded", config), ("plain", small_config(**config_without_rails()))):
        orch = make_orch(fleet, name=name)
        placed = orch.request(request, thread_id=name, wait=False)
        assert placed.allocation is not None
        Commands(orch.services.ledger).started(placed.allocation.id, new_owner("run"), 0.0)
        out = orch.resume(name)
        assert out.release is not None and out.release.reason is ReleaseReason.LEASE_EXPIRED
        held[name] = out.release.hours
        if name == "guarded":
            (why,) = lease_events(out)
            assert why.startswith("lease not renewed: every GPU idle for "), why
            assert "all its 1 h term; it ends at 2026-01-01 01:00:00 UTC" in why
            assert out.allocation is not None and out.allocation.term_hours is None
            assert lease_note(out) == (  # not "renewed while its GPUs work, up to 8.00 h"
                "its term not renewed (its GPUs sat idle all of it): the lease ends with it"
            )
            assert out.allocation is not None
            again = orch.request(request | {"resumes": out.allocation.id}, wait=False)
            assert again.status is Status.PENDING_REVIEW  # its record is worse now
            again = orch.resume(again.thread_id, {"approve": True, "by": "ann"}, wait=False)
            assert again.allocation is not None
            Commands(orch.services.ledger).started(again.allocation.id, new_owner("run"), 0.0)
            spared = orch.resume(again.thread_id)
            assert spared.release is not None
            held["spared"] = spared.release.hours
            assert lease_events(spared) == [  # not "its GPUs work": they sat idle
                "lease renewed to 2026-01-01 03:00:00 UTC: its GPUs idle no longer than a "
                "pause its work came back from",
                *(
                    f"lease renewed to 2026-01-01 {h:02d}:00:00 UTC: it resumes work an idle "
                    "release or a declined term ended (spared)"
                    for h in range(4, 10)
                ),
            ]
    assert held["guarded"] == pytest.approx(1.0)
    assert held["plain"] == held["spared"] == pytest.approx(8.0)


def test_a_term_declined_before_a_crash_is_shown_declined(make_orch: OrchFactory) -> None:
    """The monitor let the term end (the ledger's `not-renewed` entry committed) and its
    process died before that tick's checkpoint: the thread carried on from its checkpoint
    ends with the term gone and says why, as if the tick had been checkpointed."""
    orch = make_orch(small_config(council=LEASED_FLEET))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 6}
    placed = orch.request(request, thread_id="t", wait=False)
    assert placed.allocation is not None and placed.allocation.term_hours == 1.0
    ledger, clock = orch.services.ledger, orch.services.clock
    end = ledger.lease(placed.allocation.id).lease_end
    assert end is not None
    ledger.decline(placed.allocation.id, end, clock.now(), "every GPU idle all its term")
    clock.sleep(end - clock.now() + 60)  # its term ran out while nothing carried it on
    out = orch.resume("t")
    assert out.release is not None and out.release.reason is ReleaseReason.LEASE_EXPIRED
    assert out.allocation is not None and out.allocation.term_hours is None
    assert out.allocation.lease_cut == "not-renewed"
    assert lease_note(out) == (
        "its term not renewed (its GPUs sat idle all of it): the lease ends with it"
    )


def test_a_preempted_term_held_lease_is_shown_renewed_no_more(make_orch: OrchFactory) -> None:
    """A guarded lease held a 1 h term at a time (3 h on the H100) is asked to yield: the
    ledger cuts its lease to the yield and renews it no more, and so does what the thread
    says (the CLI's note, its JSON, the guardrails shown), before and after the release."""
    orch = make_orch(small_config(council=LEASED_FLEET))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 6}
    placed = orch.request(request | {"notice_seconds": 120}, thread_id="t", wait=False)
    assert placed.allocation is not None and placed.allocation.term_hours == 1.0
    assert (lease_note(placed) or "").startswith("held 1 h at a time")
    moved = orch.services.preempt(placed.allocation.id, "the pool takes it back", by="admin")
    assert moved.after == placed.allocation.started_at.timestamp() + 30 * 60  # min_run
    out = orch.resume("t")
    assert out.release is not None and out.release.reason is ReleaseReason.PREEMPTED
    a = out.allocation
    assert a is not None and a.term_hours is None and a.renewed_up_to is None
    assert a.lease_end.timestamp() == moved.after == out.release.released_at.timestamp()
    assert lease_note(out) == (
        "preempted: it yields its GPUs at the end shown, after its checkpoint notice, "
        "and is renewed no more"
    )
    shown = out.to_json()["allocation"]
    assert (shown["term_hours"], shown["renewed_up_to"]) == (None, None)
    assert shown["lease_cut"] == "preempted"
    rails = out.guardrails()
    assert rails is not None and "renewed" not in rails[1].describe()
    assert lease_events(out) == []  # no term was decided: the yield came first


def config_without_rails() -> dict[str, Any]:
    return {"simulation": {"workloads": {"lazy": "hoard"}}}


def test_a_human_who_drops_the_guardrails_drops_the_term_too(make_orch: OrchFactory) -> None:
    split = LEASED_FLEET | {"guard_share": 0.95}  # guard at 0.95 > p = 0.91: a human's
    orch = make_orch(small_config(council=split))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 3}
    orch.request(request, thread_id="t")
    out = orch.resume("t", {"approve": True, "by": "bob", "guardrails": False})
    assert out.release is not None and out.release.reason is ReleaseReason.LEASE_EXPIRED
    assert out.allocation is not None and lease_events(out) == []
    row = orch.services.ledger.get(out.allocation.id)
    assert row.hours > 1.0 and out.release.hours == pytest.approx(row.hours)  # whole


def test_a_term_no_shorter_than_the_lease_is_no_guardrail_and_a_long_notice_lengthens_it(
    make_orch: OrchFactory,
) -> None:
    """A 1 h term on a lease of 1 h (1 h asked on the reference type, on an H100 that does
    the work in half of it): the lease runs whole, and the guardrails shown once placed
    promise no term. A 2,000 s
    checkpoint notice with a quarter-hour term: the term is made twice the decision's lead
    (a tick and the notice), so each decision reads half a term or more, and the guardrails
    shown say so."""
    orch = make_orch(small_config(council=LEASED_FLEET))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 1}
    short = orch.request(request, wait=False)
    assert short.council is not None and short.council.guardrails is not None
    assert short.council.guardrails.lease_hours == 1.0  # the fleet's, before placement
    assert short.allocation is not None and short.allocation.term_hours is None
    shown = short.guardrails()
    assert shown is not None and shown[1].lease_hours is None  # as placed: whole
    assert "renewed" not in shown[1].describe()
    quarter = make_orch(
        small_config(council=LEASED_FLEET | {"guard_lease_hours": 0.25}), name="quarter"
    )
    long = quarter.request(request | {"duration_hours": 8, "notice_seconds": 2000}, wait=False)
    assert long.allocation is not None and long.council is not None
    assert long.council.guardrails is not None and long.council.guardrails.lease_hours == 0.25
    assert long.allocation.term_hours == pytest.approx(2 * (60 + 2000) / 3600)
    shown = long.guardrails()
    assert shown is not None and "a 1.14 h lease, renewed while its GPUs work" in (
        shown[1].describe()
    )
    placed = long.to_json()["allocation"]
    assert placed["term_hours"] == pytest.approx(2 * (60 + 2000) / 3600)
    assert placed["renewed_up_to"] == "2026-01-01T08:00:00+00:00"  # 8 h asked, on the H100 too
    assert short.to_json()["allocation"]["renewed_up_to"] is None
    quarter.release(long.allocation.id)  # its GPUs free for an agent, whose tool says it too
    request_gpus, release_gpus, _ = tools = gpu_tools(quarter)
    got = request_gpus.invoke({"project": "vision", "count": 2, "hours": 8})
    assert got["status"] == "allocated" and got["term_hours"] == 0.25
    assert got["renewed_up_to"] == "2026-01-01T08:00:00+00:00"
    assert release_gpus.invoke({"allocation_id": got["allocation_id"]})["status"] == "released"
    for monitor in tools[0].metadata["monitors"]:  # type: ignore[index]
        monitor.join(30)


def test_a_stream_guardrail_needs_a_guarded_band_and_says_what_it_does() -> None:
    settings = CouncilSettings(guard_share=0.5, guard_idle_release="stream")
    rails = guardrails(0.9, settings)
    assert rails.idle_stream and not guardrails(0.9, S).idle_stream
    assert rails.describe().startswith(
        "`gpu-agent run` required (else idle release after 10 min, sooner where its "
        "utilisation reads as ended)"
    )
    with pytest.raises(ValidationError, match="guard_idle_release needs guard_share"):
        CouncilSettings(guard_idle_release="stream")
    with pytest.raises(ValidationError):
        CouncilSettings.model_validate({"guard_share": 0.5, "guard_idle_release": "model"})


STREAM_GUARD = (
    '\n[council]\npolicy = "reference"\ndeny_threshold = 0.000001\n'
    "approve_threshold = 0.999999\nguard_share = 0.000001\nguard_idle_minutes = 60\n"
)


def test_a_stream_guardrail_lets_a_guarded_tail_go_when_its_stream_reads_as_ended(
    tmp_path: Path,
) -> None:
    """`[council] guard_idle_release = "stream"`: 2 h of work on the named A100 at 80 %, half
    of the 4 h lease, then a 3 h idle tail, two GPUs (so the council votes, and guards it).
    The stream model releases the guarded allocation at the idle stretch's first 5-minute
    tick, where the guardrail's clock (60 minutes, no shorter than the fleet's 30) waits 30;
    the same work done. A job small enough to be approved without a vote keeps the clock."""
    tail = [Phase(2.0, 80.0), Phase(3.0, 0.0)]
    jobs = [job(0, "p", 0, tail, count=2, requested=4.0, named="A100")]
    jobs.append(job(1, "q", 0, tail, count=1, requested=4.0, named="A100"))
    w = Workload(jobs, {"p": 1000.0, "q": 1000.0})
    held = {}
    for release in ("stream", "timeout"):
        fleet = parse_fleet(TINY_FLEET + STREAM_GUARD + f'guard_idle_release = "{release}"\n')
        run = run_gpu_agent(w, fleet, tmp_path / release)
        guarded, alone = sorted(run.attempts, key=lambda a: a.job)
        assert (guarded.outcome, guarded.reason) == ("completed", "idle")
        assert guarded.work_gpu_hours == pytest.approx(2 * 2.0)
        held[release] = (held_s(guarded), held_s(alone))
    assert held["stream"] == pytest.approx((125 * 60, 150 * 60))
    assert held["timeout"] == pytest.approx((150 * 60, 150 * 60))


def test_a_stored_stream_guardrail_reads_the_stream_only_while_the_fleet_still_does(
    make_orch: OrchFactory,
) -> None:
    """The guardrails a request was approved with are kept in its thread; a fleet restarted
    with `guard_idle_release = "timeout"` has not loaded the stream model (check_models), so
    its monitor releases those allocations by the clock alone."""
    stream = GUARDED_FLEET | {"guard_idle_release": "stream"}
    orch = make_orch(small_config(council=stream))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 4}
    out = orch.request(request, wait=False)
    assert out.council is not None and out.council.guardrails is not None
    assert out.council.guardrails.idle_stream and out.allocation is not None
    assert out.request is not None
    state: State = {"council": out.council, "request": out.request, "allocation": out.allocation}
    assert _policy("unknown", state, MonitorState(), orch.services).release_after is not None
    clock = make_orch(small_config(council=GUARDED_FLEET), name="clock")
    assert _policy("unknown", state, MonitorState(), clock.services).release_after is None
    spared = MonitorState(guard_spared=True)
    assert _policy("unknown", state, spared, orch.services).release_after is None


def test_the_stream_reads_the_lease_as_placed_after_a_cut(make_orch: OrchFactory) -> None:
    """A preemption cuts the thread's lease to the yield (Allocation.lease_cut); the stream
    model goes on reading the lease the job asked for, which says how long it was expected to
    run, not the few minutes to its yield."""
    orch = make_orch(small_config(council=GUARDED_FLEET | {"guard_idle_release": "stream"}))
    request = {"project": "vision", "purpose": "training", "count": 2, "duration_hours": 4}
    out = orch.request(request, wait=False)
    council, asked, placed = out.council, out.request, out.allocation
    assert council is not None and asked is not None and placed is not None
    cut = placed.model_copy(
        update={"lease_end": placed.started_at + (placed.lease_end - placed.started_at) / 40}
    )
    cut = cut.model_copy(update={"lease_cut": "preempted"})
    asked_end = orch.services.ledger.lease(placed.id).asked_end

    def lease_hours(allocation: Allocation) -> float:
        state: State = {"council": council, "request": asked, "allocation": allocation}
        releaser = _policy("unknown", state, MonitorState(), orch.services, asked_end)
        assert isinstance(releaser.release_after, functools.partial)
        return float(releaser.release_after.keywords["lease_hours"])

    assert asked_end is not None
    hours = (asked_end - placed.started_at.timestamp()) / 3600.0
    assert lease_hours(placed) == pytest.approx(hours)
    assert lease_hours(cut) == pytest.approx(hours)  # not the cut lease, as without lease_cut:
    assert lease_hours(cut.model_copy(update={"lease_cut": None})) == pytest.approx(hours / 40)

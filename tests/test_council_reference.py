"""The rule-based reference council: votes with reasons, quorum, thresholds, monotonicity."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from council.features import RequestFeatures, build_features
from council.neural_council import NeuralCouncil
from council.record import PastJob, Rates, rates
from council.rules import MEMBERS, ReferenceCouncil, member_vote
from council.voting import combine, convene
from fleet.config import CouncilSettings, FleetConfig
from fleet.models import (
    CouncilOutcome,
    GPURequest,
    HistoryRecord,
    MemberVote,
    ProjectStats,
    ReleaseReason,
    Verdict,
    utc,
)

SETTINGS = CouncilSettings()
GOOD = RequestFeatures(
    count=2,
    hours=4,
    priority=0.5,
    worst_case_usd=32,
    cost_pressure=0.06,
    budgeted=False,
    usage_share=0.0,
    fair_share=1.0,
    pool_share=0.1,
    pool_busy=0.2,
    hoarding_rate=0.0,
    overrun_rate=0.0,
    recent_util=75,
    history_len=5,
    purpose_mismatch=0.0,
)


def council_p(f: RequestFeatures) -> float:
    return ReferenceCouncil().decide(f, SETTINGS).probability


def test_a_reasonable_request_is_approved_with_reasons() -> None:
    decision = ReferenceCouncil().decide(GOOD, SETTINGS)
    assert decision.outcome is CouncilOutcome.APPROVED and decision.probability > 0.8
    assert [v.member for v in decision.votes] == list(MEMBERS)
    assert all(v.reasons for v in decision.votes if v.member != "risk")


def test_a_hoarder_asking_for_the_pool_is_denied() -> None:
    bad = dataclasses.replace(
        GOOD,
        count=16,
        worst_case_usd=1536,
        cost_pressure=3.0,
        pool_share=0.67,
        pool_busy=0.5,
        hoarding_rate=1.0,
        recent_util=2,
    )
    decision = ReferenceCouncil().decide(bad, SETTINGS)
    assert decision.outcome is CouncilOutcome.DENIED
    risk = next(v for v in decision.votes if v.member == "risk")
    assert risk.verdict is Verdict.DENY and risk.reasons[0].feature == "hoarding_rate"


def test_reasons_say_how_old_the_record_they_cite_is() -> None:
    """The record fades as it ages, so a reason cites when it last happened: the newest
    allocation held idle with no work left, the newest stopped by the budget."""
    now = 1_800_000_000.0
    day = 86_400.0

    def job(days_ago: float, reason: ReleaseReason, hoarded: float = 0.0) -> PastJob:
        return PastJob(now - days_ago * day, 2, 10.0, 100.0, 30.0, reason, 0.2, hoarded)

    past = (
        job(120, ReleaseReason.IDLE, hoarded=2.0),
        job(94, ReleaseReason.IDLE, hoarded=1.0),
        job(30, ReleaseReason.BUDGET),
        job(0.5, ReleaseReason.EXPLICIT),
    )
    f = dataclasses.replace(GOOD, hoarding_rate=0.2, overrun_rate=0.3, past=past, now=now)
    risk = next(v for v in ReferenceCouncil().decide(f, SETTINGS).votes if v.member == "risk")
    texts = {r.feature: r.text for r in risk.reasons}
    assert texts["hoarding_rate"].endswith("with no work left; the last 94 days ago")
    assert texts["overrun_rate"].endswith("stopped by the budget; the last 30 days ago")
    recent = dataclasses.replace(f, past=(*past, job(0.25, ReleaseReason.BUDGET)))
    risk = next(v for v in ReferenceCouncil().decide(recent, SETTINGS).votes if v.member == "risk")
    assert {r.feature: r.text for r in risk.reasons}["overrun_rate"].endswith("the last 6 h ago")
    assert "ago" not in member_vote("risk", dataclasses.replace(f, past=())).reasons[0].text


def test_quorum_and_split() -> None:
    def vote(p: float, verdict: Verdict) -> MemberVote:
        return MemberVote(member="m", verdict=verdict, probability=p)

    split = combine(
        [vote(0.9, Verdict.APPROVE), vote(0.1, Verdict.DENY), vote(0.5, Verdict.APPROVE)],
        SETTINGS,
        "t",
    )
    assert split.outcome is CouncilOutcome.SPLIT
    no_quorum = combine(
        [
            vote(0.99, Verdict.APPROVE),
            vote(0.99, Verdict.APPROVE),
            vote(0.54, Verdict.ABSTAIN),
            vote(0.54, Verdict.ABSTAIN),
        ],
        SETTINGS,
        "t",
    )
    # a quorum counts approvers: a member turning from unsure to "deny" cannot complete it
    assert (
        combine(
            [vote(0.95, Verdict.APPROVE), vote(0.95, Verdict.APPROVE), vote(0.3, Verdict.DENY)],
            SETTINGS,
            "t",
        ).outcome
        is CouncilOutcome.SPLIT
    )
    assert no_quorum.probability > SETTINGS.band("reference")[1]
    assert no_quorum.outcome is CouncilOutcome.SPLIT and "quorum" in no_quorum.summary
    unsure_no = combine(
        [vote(0.01, Verdict.DENY), vote(0.2, Verdict.DENY), vote(0.48, Verdict.ABSTAIN)],
        SETTINGS,
        "t",
    )
    assert unsure_no.outcome is CouncilOutcome.DENIED  # denial needs no quorum


def test_member_abstains_when_unsure() -> None:
    unsure = dataclasses.replace(GOOD, fair_share=0.35)  # fairness logit -1.4 + 1.4 = 0
    assert member_vote("fairness", unsure).verdict is Verdict.ABSTAIN


def test_small_requests_skip_the_members_but_critical_ones_do_not() -> None:
    small = dataclasses.replace(GOOD, count=1, worst_case_usd=5)
    assert (
        convene(ReferenceCouncil(), small, False, SETTINGS).outcome is CouncilOutcome.AUTO_APPROVED
    )
    voted = convene(ReferenceCouncil(), small, True, SETTINGS)
    assert voted.outcome is CouncilOutcome.APPROVED and voted.votes


unit = st.floats(0, 1)


@settings(max_examples=200, deadline=None)
@given(
    base=st.builds(
        dataclasses.replace,
        st.just(GOOD),
        hoarding_rate=unit,
        overrun_rate=unit,
        recent_util=st.floats(0, 100),
        cost_pressure=st.floats(0, 10),
    ),
    more=unit,
    worse=st.floats(0, 100),
)
def test_worse_records_never_raise_approval(
    base: RequestFeatures, more: float, worse: float
) -> None:
    p = council_p(base)
    replace = dataclasses.replace
    assert council_p(replace(base, overrun_rate=min(1, base.overrun_rate + more))) <= p
    assert council_p(replace(base, hoarding_rate=min(1, base.hoarding_rate + more))) <= p
    assert council_p(replace(base, recent_util=max(0, base.recent_util - worse))) <= p
    assert council_p(replace(base, cost_pressure=base.cost_pressure + more)) <= p
    rank = {
        CouncilOutcome.DENIED: 0,
        CouncilOutcome.SPLIT: 1,
        CouncilOutcome.GUARDED: 2,
        CouncilOutcome.APPROVED: 3,
    }
    worse_f = dataclasses.replace(
        base,
        hoarding_rate=min(1, base.hoarding_rate + more),
        recent_util=max(0, base.recent_util - worse),
    )
    council = ReferenceCouncil()
    assert (
        rank[council.decide(worse_f, SETTINGS).outcome]
        <= rank[council.decide(base, SETTINGS).outcome]
    )


def test_features_read_the_project_record(config: FleetConfig) -> None:
    t = utc(1.8e9)
    record = HistoryRecord(
        allocation_id="a",
        thread_id="t",
        project="p",
        purpose="research",
        gpu_type="RTX4090",
        count=2,
        gpu_ids=["g1", "g2"],
        started_at=t,
        ended_at=t,
        hours=1.0,
        cost_usd=1.2,
        reason=ReleaseReason.IDLE,
        mean_util_pct=1.0,
        hoarded_hours=1.0,
    )  # idle throughout
    stats = ProjectStats(
        project="p",
        budget_usd=100,
        spent_usd=20,
        committed_usd=30,
        active_gpus=0,
        decayed_gpu_hours=2,
        usage_share=0.5,
        fair_share=0.25,
        recent=[record],
    )
    request = GPURequest(
        project="p", purpose="inference", gpu_type="A100", count=1, duration_hours=2
    )
    f = build_features(request, config, stats, {"T4": 1}, t.timestamp())
    prior = config.council.record_prior_gpu_hours  # neutral GPU-hours: no waste, 50 % util
    assert f.hoarding_rate == 2 / (2 + prior) and f.purpose_mismatch == 1.0
    assert f.recent_util == (1.0 * 2 + 50 * prior) / (2 + prior)
    assert f.past[0].reason is ReleaseReason.IDLE and f.now == t.timestamp()
    assert f.cost_pressure == 2 * 5.12 / 50 and f.budgeted
    assert f.pool_busy == 0.5 and f.pool_share == 0.5
    # a record written by a host whose clock runs ahead counts as ending now: the council
    # still decides (its history must be in time order) rather than fail the request
    behind = t.timestamp() - 3600
    late = build_features(request, config, stats, {"T4": 1}, behind)
    assert late.past[0].ended_at == behind
    assert ReferenceCouncil().decide(late, config.council).probability > 0
    NeuralCouncil.load().decide(late, config.council)


def test_only_the_hours_held_with_no_work_left_are_hoarding(config: FleetConfig) -> None:
    """An allocation released for idling after 3.5 h of work and a 30-minute tail hoarded
    the tail, not the 4 hours; one the user released after its work hoarded nothing."""
    now = 1.8e9
    tail = PastJob(now, 2, 4.0, 10.0, 60.0, ReleaseReason.IDLE, hoarded_hours=0.5)
    done = PastJob(now, 2, 4.0, 10.0, 60.0, ReleaseReason.EXPLICIT)
    prior = config.council.record_prior_gpu_hours
    assert rates([tail], None, now, 7, prior).hoarding == 1.0 / (8.0 + prior)
    assert rates([done], None, now, 7, prior).hoarding == 0.0


def test_older_records_decay_and_a_reformed_project_is_forgiven(config: FleetConfig) -> None:
    day = 86400.0
    now = 1.8e9

    def job(days_ago: float, reason: ReleaseReason, util: float) -> PastJob:
        idle = 5.0 if reason is ReleaseReason.IDLE else 0.0  # idle throughout
        return PastJob(now - days_ago * day, 4, 5.0, 100.0, util, reason, hoarded_hours=idle)

    hoarded_long_ago = [job(60, ReleaseReason.IDLE, 1), job(3, ReleaseReason.EXPLICIT, 80)]
    hoarded_lately = [job(60, ReleaseReason.EXPLICIT, 80), job(3, ReleaseReason.IDLE, 1)]
    old, new = (rates(h, None, now, 7, 4) for h in (hoarded_long_ago, hoarded_lately))
    assert old.hoarding < 0.01 < 0.5 < new.hoarding
    assert old.util > 70 > 20 > new.util
    assert rates([], None, now, 7, 4) == Rates(0.0, 0.0, 50.0)

"""From member votes to one decision: weighted soft vote, abstentions, quorum, thresholds."""

from __future__ import annotations

import math
from typing import Protocol

from council.features import RequestFeatures
from council.guardrails import guardrails
from fleet.config import CouncilSettings
from fleet.models import CouncilDecision, CouncilOutcome, MemberVote, Verdict


class Council(Protocol):
    name: str

    def decide(self, features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision: ...


def calibrate(p: float, temperature: float) -> float:
    """Temperature scaling of the averaged probability: monotone, so it never reorders."""
    if temperature == 1.0 or p in (0.0, 1.0):
        return p
    return 1.0 / (1.0 + math.exp(-math.log(p / (1.0 - p)) / temperature))


def combine(
    votes: list[MemberVote],
    settings: CouncilSettings,
    policy: str,
    temperature: float = 1.0,
    gpu_hours: float | None = None,
) -> CouncilDecision:
    """Weighted soft vote over every member; then approve (at or above the approve threshold,
    with `quorum` members approving outright), approve with guardrails (where the fleet opted
    in, `guard_share`: at or above the guard threshold, or above approve without a quorum),
    ask a human, or deny (at or below the deny threshold; a human decides there instead
    where the fleet turns `auto_deny` off). Where the fleet also sets
    `guard_gpu_hours`, from the guard threshold up the request's GPU-hours (`gpu_hours`, count
    x hours asked) decide instead of the approve threshold: guardrails where the GPU-hours at
    risk, (1 - p) x gpu_hours, reach it (or without a quorum), a plain approval below: a
    burden is worth what it may save, and a small request saves little.

    Keeping unsure (abstaining) members in the average, rather than dropping them, makes the
    council's probability a monotone function of each member's; and since only approval
    needs a quorum of approvers, a worse record can never turn a decision into a kinder one
    (denied < human < guarded < approved).
    """
    weight = sum(v.weight for v in votes)
    p = sum(v.probability * v.weight for v in votes) / weight if weight > 0 else 0.5
    p = calibrate(p, temperature)
    deny, approve = settings.band()
    guard = settings.guard()
    approvers = sum(v.verdict is Verdict.APPROVE for v in votes)
    quorate = approvers >= min(settings.quorum, len(votes))
    rails = None
    at_risk = gpu_hours_at_risk(p, gpu_hours, settings)
    worth_no_rails = at_risk is not None and not worth_guarding(at_risk, settings)
    if p <= deny and settings.auto_deny:
        outcome, summary = CouncilOutcome.DENIED, f"denied with p={p:.2f}"
    elif worth_no_rails and p >= guard and quorate:
        outcome = CouncilOutcome.APPROVED
        summary = f"approved with p={p:.2f}: {at_risk:.1f} GPU-hours at risk, too few to guard"
    elif p >= approve and quorate and at_risk is None:
        outcome, summary = CouncilOutcome.APPROVED, f"approved with p={p:.2f}"
    else:  # a fleet that opted in to guardrails also shows a human what approval carries
        rails = None if settings.guard_share is None else guardrails(p, settings, at_risk)
        short = f"no quorum: {approvers} of {len(votes)} members approve"  # p >= approve
        if rails is not None and p >= guard:
            outcome = CouncilOutcome.GUARDED
            summary = f"approved with guardrails at p={p:.2f}: {rails.describe()}"
            if at_risk is not None:
                summary += f"; {at_risk:.1f} GPU-hours at risk"  # the reason for them
            summary += f"; {short}" if not quorate and p >= approve else ""
        else:
            outcome = CouncilOutcome.SPLIT
            summary = (
                f"{short}; a human decides"
                if p >= approve
                else f"split at p={p:.2f}: a human decides"
                if p > deny
                else f"below the deny threshold at p={p:.2f}: a human decides (no auto-deny)"
            )
    if outcome is not CouncilOutcome.APPROVED:
        against = sorted(
            (v for v in votes if v.verdict is Verdict.DENY), key=lambda v: v.probability
        )
        if against and against[0].reasons:
            summary += f" ({against[0].member}: {against[0].reasons[0].text})"
    return CouncilDecision(
        outcome=outcome,
        probability=p,
        votes=votes,
        quorum=settings.quorum,
        policy=policy,
        summary=summary,
        guardrails=rails,
    )


def gpu_hours_asked(features: RequestFeatures) -> float:
    """What the request asks for, in GPU-hours: what an approval puts at risk."""
    return features.count * features.hours


def gpu_hours_at_risk(p: float, gpu_hours: float | None, settings: CouncilSettings) -> float | None:
    """The GPU-hours an approval puts at risk, (1 - p) x those asked, where the fleet guards
    by them (`guard_gpu_hours`); else None."""
    if settings.guard_gpu_hours is None or settings.guard_share is None or gpu_hours is None:
        return None
    return (1.0 - p) * gpu_hours


def worth_guarding(at_risk: float, settings: CouncilSettings) -> bool:
    """Whether GPU-hours at risk reach the fleet's `guard_gpu_hours`."""
    return at_risk >= (settings.guard_gpu_hours or 0.0)


def auto_approves(features: RequestFeatures, critical: bool, settings: CouncilSettings) -> bool:
    """Small, cheap, non-critical requests skip the members."""
    return small(
        features.count, features.worst_case_usd, features.cost_pressure, critical, settings
    )


def small(
    count: int,
    worst_case_usd: float,
    cost_pressure: float,
    critical: bool,
    settings: CouncilSettings,
) -> bool:
    """The auto-approval rule on its inputs, so a caller can apply it before it gathers the
    project's record (which the rule does not read)."""
    return (
        not critical
        and count <= settings.auto_approve_max_gpus
        and worst_case_usd <= settings.auto_approve_max_usd
        and cost_pressure < 1.0
    )


def auto_approval(count: int, worst_case_usd: float, settings: CouncilSettings) -> CouncilDecision:
    return CouncilDecision(
        outcome=CouncilOutcome.AUTO_APPROVED,
        probability=1.0,
        quorum=settings.quorum,
        policy="auto-approve",
        summary=f"small request: {count} GPU, ${worst_case_usd:.2f}",
    )


def convene(
    council: Council, features: RequestFeatures, critical: bool, settings: CouncilSettings
) -> CouncilDecision:
    """Small, cheap, non-critical requests skip the members; everything else is voted on."""
    if auto_approves(features, critical, settings):
        return auto_approval(features.count, features.worst_case_usd, settings)
    return council.decide(features, settings)

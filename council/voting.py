"""From member votes to one decision: weighted soft vote, abstentions, quorum, thresholds."""

from __future__ import annotations

from typing import Protocol

from council.features import RequestFeatures
from fleet.config import CouncilSettings
from fleet.models import CouncilDecision, MemberVote, Outcome, Verdict


class Council(Protocol):
    name: str

    def decide(self, features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision: ...


def combine(votes: list[MemberVote], settings: CouncilSettings, policy: str) -> CouncilDecision:
    """Weighted soft vote over every member; abstentions count against the quorum only.

    Keeping unsure members in the average (rather than dropping them) makes the council's
    probability a monotone function of each member's, and approval (never denial) needs a
    quorum, so a worse record can never turn a denial into anything kinder.
    """
    weight = sum(v.weight for v in votes)
    p = sum(v.probability * v.weight for v in votes) / weight if weight > 0 else 0.5
    confident = sum(v.verdict is not Verdict.ABSTAIN for v in votes)
    if p <= settings.deny_threshold:
        outcome, summary = Outcome.DENIED, f"denied with p={p:.2f}"
    elif p < settings.approve_threshold:
        outcome, summary = Outcome.SPLIT, f"split at p={p:.2f}: a human decides"
    elif confident < settings.quorum:
        outcome = Outcome.SPLIT
        summary = f"no quorum: {confident} of {len(votes)} members are sure; a human decides"
    else:
        outcome, summary = Outcome.APPROVED, f"approved with p={p:.2f}"
    if outcome is not Outcome.APPROVED:
        against = sorted((v for v in votes if v.verdict is Verdict.DENY),
                         key=lambda v: v.probability)
        if against and against[0].reasons:
            summary += f" ({against[0].member}: {against[0].reasons[0].text})"
    return CouncilDecision(
        outcome=outcome, probability=p, votes=votes, quorum=settings.quorum, policy=policy,
        summary=summary,
    )


def convene(council: Council, features: RequestFeatures, critical: bool,
            settings: CouncilSettings) -> CouncilDecision:
    """Small, cheap, non-critical requests skip the members; everything else is voted on."""
    if (
        not critical
        and features.count <= settings.auto_approve_max_gpus
        and features.worst_case_usd <= settings.auto_approve_max_usd
        and features.cost_pressure < 1.0
    ):
        return CouncilDecision(
            outcome=Outcome.AUTO_APPROVED, probability=1.0, quorum=settings.quorum,
            policy="auto-approve",
            summary=f"small request: {features.count} GPU, ${features.worst_case_usd:.2f}",
        )
    return council.decide(features, settings)

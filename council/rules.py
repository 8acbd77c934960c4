"""The transparent rule-based council: four members, each a logistic rule over features.

It is the reference policy the neural council learns from. Every term is a signed pull in
logit units, reported as a Reason, so a vote explains itself. Terms for overrun, hoarding
and poor utilisation only ever pull down: a worse record can never raise approval.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from council.features import REFERENCE_USD, RequestFeatures
from council.record import PastJob
from council.voting import combine, gpu_hours_asked
from fleet.config import CouncilSettings
from fleet.models import CouncilDecision, MemberVote, Reason, Verdict

ABSTAIN_MARGIN = 0.05


def sigmoid(x: float) -> float:
    """The logistic function of one logit."""
    return 1.0 / (1.0 + math.exp(-x))


Term = tuple[str, float, float, str]  # feature, value, effect (logits), text


def _cost(f: RequestFeatures) -> tuple[float, list[Term]]:
    of = "the project's remaining budget" if f.budgeted else f"${REFERENCE_USD:.0f} (no budget)"
    return 3.0, [
        (
            "cost_pressure",
            f.cost_pressure,
            -6.0 * f.cost_pressure,
            f"worst case ${f.worst_case_usd:.2f}{_on(f)} is {100 * f.cost_pressure:.0f}% of {of}",
        ),
        (
            "purpose_mismatch",
            f.purpose_mismatch,
            -1.5 * f.purpose_mismatch,
            "asks for training hardware for other work",
        ),
    ]


def _on(f: RequestFeatures) -> str:
    """The route the worst case is priced on, as a reason names it."""
    return "" if f.priced is None else f" ({f.priced.describe()})"


def _fairness(f: RequestFeatures) -> tuple[float, list[Term]]:
    return -1.4, [
        (
            "fair_share",
            f.fair_share,
            4.0 * f.fair_share,
            f"fair-share factor {f.fair_share:.2f} "
            f"(decayed usage share {100 * f.usage_share:.0f}%)",
        ),
    ]


def _capacity(f: RequestFeatures) -> tuple[float, list[Term]]:
    return 3.0, [
        (
            "pool_share",
            f.pool_share,
            -5.0 * f.pool_share,
            f"asks for {100 * f.pool_share:.0f}% of the pool",
        ),
        ("pool_busy", f.pool_busy, -2.0 * f.pool_busy, f"pool {100 * f.pool_busy:.0f}% busy"),
        ("priority", f.priority, 0.8 * (f.priority - 0.5), "priority"),
    ]


def _last(f: RequestFeatures, happened: Callable[[PastJob], bool]) -> str:
    """When the newest allocation of the record for which `happened` holds ended, as a
    reason words it (the record fades with age: a reader should see how old it is)."""
    last = max((j.ended_at for j in f.past if happened(j)), default=None)
    if last is None or f.now <= 0:
        return ""
    hours = max(0.0, f.now - last) / 3600.0
    return (
        f"; the last {hours / 24:.0f} days ago" if hours >= 48 else f"; the last {hours:.0f} h ago"
    )


def _risk(f: RequestFeatures) -> tuple[float, list[Term]]:
    low_util = max(0.0, 40.0 - f.recent_util)
    idle = _last(f, lambda j: j.hoarded_hours > 0)
    cut = _last(f, lambda j: j.reason.cut_by_budget)
    return 2.0, [
        (
            "hoarding_rate",
            f.hoarding_rate,
            -5.0 * f.hoarding_rate,
            f"{100 * f.hoarding_rate:.0f}% of recent GPU-hours were held idle with no work "
            f"left{idle}",
        ),
        (
            "overrun_rate",
            f.overrun_rate,
            -3.0 * f.overrun_rate,
            f"{100 * f.overrun_rate:.0f}% of recent GPU-hours were stopped by the budget{cut}",
        ),
        (
            "recent_util",
            f.recent_util,
            -0.04 * low_util,
            f"recent mean utilisation {f.recent_util:.0f}%",
        ),
        (
            "purpose_mismatch",
            f.purpose_mismatch,
            -1.5 * f.purpose_mismatch,
            "inference or research on training hardware",
        ),
    ]


MEMBERS: dict[str, Callable[[RequestFeatures], tuple[float, list[Term]]]] = {
    "cost": _cost,
    "fairness": _fairness,
    "capacity": _capacity,
    "risk": _risk,
}


def member_vote(name: str, f: RequestFeatures) -> MemberVote:
    bias, terms = MEMBERS[name](f)
    p = sigmoid(bias + sum(effect for _, _, effect, _ in terms))
    if abs(p - 0.5) < ABSTAIN_MARGIN:
        verdict = Verdict.ABSTAIN
    else:
        verdict = Verdict.APPROVE if p >= 0.5 else Verdict.DENY
    reasons = sorted(
        (Reason(feature=n, value=v, effect=e, text=t) for n, v, e, t in terms if e != 0.0),
        key=lambda r: -abs(r.effect),
    )
    return MemberVote(member=name, verdict=verdict, probability=p, reasons=reasons)


def describe(f: RequestFeatures) -> dict[str, tuple[float, str]]:
    """Each feature the rules read, with its value and how the rules word it."""
    return {n: (v, t) for member in MEMBERS.values() for n, v, _, t in member(f)[1]}


class ReferenceCouncil:
    """Rule-based members voting by weighted soft vote; the neural council's teacher."""

    name = "reference-v1"

    def decide(self, features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision:
        votes = [member_vote(name, features) for name in MEMBERS]
        reference = settings.model_copy(update={"policy": "reference"})
        return combine(votes, reference, self.name, gpu_hours=gpu_hours_asked(features))

"""How decisions compare with outcomes: ranking (AUC), calibration (ECE), the figures of one
policy's decisions on requests whose outcomes are known, and a band chosen from outcomes.
Shared by training on outcomes (council.train) and `council evaluate` (council.evaluate)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from council.dataset import Sample
from fleet.models import CouncilDecision, CouncilOutcome

# the outcomes that approve without a human: plain, and with guardrails
APPROVES = frozenset({CouncilOutcome.APPROVED, CouncilOutcome.GUARDED})
FIGURES = (
    "waste_auc",
    "ece",
    "auto_approved_waste_rate",
    "human_share",
    "good_work_denied_share",
)
# and what they leave out: the plain approvals' waste, the share approved with guardrails,
# the waste of all voted requests without guardrails and with them
DETAILS = (
    "approved_waste_rate",
    "guarded_share",
    "waste_rate",
    "guarded_waste_rate",
    "waste_auc_changed",
)
# the habit-change figure: waste AUC on the requests made within this many days after their
# project's habits changed, where its older record misleads and time should matter
CHANGE_DAYS = 30
AUTO_WASTE_GOAL = 0.05  # a learned band approves where at most this share ends wasteful
GOOD_DENIED_GOAL = 0.005  # and denies at most this share of requests that would do good work
BAND_Z = 1.645  # with 95 % confidence, one-sided (council.outcomes.upper)
# A band's outer edges: "deny nothing" and "approve nothing" as CouncilSettings accepts them
# (0 < deny < approve < 1), beyond any probability a calibrated model gives in practice
BAND_FLOOR, BAND_CEILING = 1e-6, 1 - 1e-6


def auc(score: Sequence[float], positive: Sequence[bool]) -> float:
    """The probability that a positive scores above a negative (ties count half)."""
    pairs = sorted(zip(score, positive, strict=True))
    n_pos = sum(positive)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mid = (i + 1 + j) / 2  # the mean rank of a run of ties
        rank_sum += mid * sum(p for _, p in pairs[i:j])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def ece(p: Sequence[float], y: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error over equal-width bins of p."""
    total = 0.0
    for b in range(bins):
        sel = [i for i, x in enumerate(p) if min(int(x * bins), bins - 1) == b]
        if sel:
            gap = sum(p[i] for i in sel) / len(sel) - sum(y[i] for i in sel) / len(sel)
            total += len(sel) / len(p) * abs(gap)
    return total


def share(part: float, whole: float) -> float | None:
    """part / whole; None where there is nothing to measure (no request approved)."""
    return part / whole if whole else None


def figures(
    decisions: Sequence[CouncilDecision], samples: Sequence[Sample]
) -> dict[str, float | None]:
    """The module's figures for one policy's decisions on `samples` (None: nothing to
    measure, such as the waste among approved requests where none was approved). Approved
    with guardrails counts as approved, at the outcome the same job has under its guardrails
    (`Sample.would_waste_guarded`); `approved_waste_rate` is the plain approvals' alone.
    Ranking and calibration are against the outcome without guardrails; `waste_auc_changed`
    ranks only the requests made within CHANGE_DAYS after their project's habits changed."""
    waste = [s.would_waste == 1.0 for s in samples]
    p = [d.probability for d in decisions]
    outcome = [d.outcome for d in decisions]
    # a guarded approval ends as the same job would under its guardrails
    ended = [
        s.would_waste_guarded == 1.0 if o is CouncilOutcome.GUARDED else w
        for s, w, o in zip(samples, waste, outcome, strict=True)
    ]
    approved = [e for e, o in zip(ended, outcome, strict=True) if o in APPROVES]
    plain = [w for w, o in zip(waste, outcome, strict=True) if o is CouncilOutcome.APPROVED]
    denied_good = sum(
        o is CouncilOutcome.DENIED and not w for w, o in zip(waste, outcome, strict=True)
    )
    n = len(samples)
    ranked = auc([1.0 - x for x in p], waste)
    lately = [
        i for i, s in enumerate(samples) if 0 <= s.features.now - s.changed_at < CHANGE_DAYS * 86400
    ]
    changed = auc([1.0 - p[i] for i in lately], [waste[i] for i in lately])
    return {
        "waste_auc": None if math.isnan(ranked) else ranked,
        "ece": ece(p, [0.0 if w else 1.0 for w in waste]) if n else None,
        "auto_approved_waste_rate": share(sum(approved), len(approved)),
        "approved_waste_rate": share(sum(plain), len(plain)),
        "guarded_share": share(len(approved) - len(plain), n),
        "human_share": share(sum(o is CouncilOutcome.SPLIT for o in outcome), n),
        "good_work_denied_share": share(denied_good, n),
        "requests": n,
        "waste_rate": share(sum(waste), n),
        # the same requests had every one been approved with guardrails
        "guarded_waste_rate": share(sum(s.would_waste_guarded == 1.0 for s in samples), n),
        "waste_auc_changed": None if math.isnan(changed) else changed,
        "changed_requests": len(lately),
    }


def ess(weight: Sequence[float]) -> float | None:
    """Kish's effective sample size, (sum w)^2 / sum w^2: how many equally weighted requests
    `weight` is worth; None where there is none."""
    square = sum(w * w for w in weight)
    return sum(weight) ** 2 / square if square else None


def upper(hits: float, n: float, z: float = BAND_Z) -> float:
    """The Wilson score upper bound on a share seen as `hits` of `n` (n: an effective
    sample size), one-sided at `z`: what the share may be, not merely what it was (z=0:
    the share seen)."""
    if n <= 0:
        return 1.0
    x, z2 = hits / n, z * z
    centre = x + z2 / (2 * n)
    spread = z * math.sqrt(max(0.0, x * (1 - x)) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def band(
    p: Sequence[float],
    waste: Sequence[bool],
    weight: Sequence[float] | None = None,
    z: float = BAND_Z,
) -> tuple[float, float]:
    """(deny at or below, approve at or above), chosen on the threshold slice: the lowest
    approval threshold whose approved requests end wasteful at most AUTO_WASTE_GOAL of the
    time, and the highest denial threshold that denies good work of at most GOOD_DENIED_GOAL
    of the requests, each with 95 % confidence (the Wilson upper bound, `upper`, on the
    share the slice shows; `z`=0: the share itself, for a band chosen in hindsight on the
    slice it is judged on): a goal met on average on one slice is missed on the next about
    half the time. Between them a human decides. `weight`: each request's (inverse
    propensity), where only some of them ran.

    Both shares are self-normalised IPW estimates: weighted sums divided by the sum of the
    weights, not by the number of requests, so each stays within [0, 1] and has far less
    variance than the unnormalised estimate where a few explored requests carry large
    weights (at the cost of a small bias that vanishes as they grow in number); their
    bounds count Kish's effective sample size (`ess`), not the requests.

    The band is always one CouncilSettings accepts: BAND_FLOOR <= deny < approve <=
    BAND_CEILING. Where no threshold meets the approval goal, approve is BAND_CEILING
    (approve nothing a calibrated model does not call certain); where none meets the denial
    goal (too few requests to be sure of any), deny is BAND_FLOOR; where the two overlap,
    deny sits just below approve."""
    w8 = [1.0] * len(p) if weight is None else list(weight)
    ranked = sorted(zip(p, waste, w8, strict=True), key=lambda r: -r[0])
    total, n_all = sum(w8), ess(w8) or 0.0
    approve, wasted, seen, square = BAND_CEILING, 0.0, 0.0, 0.0
    for i, (x, w, k) in enumerate(ranked):
        wasted, seen, square = wasted + k * w, seen + k, square + k * k
        last_of_its_p = i + 1 == len(ranked) or ranked[i + 1][0] != x  # ties go together
        n = seen * seen / square
        if last_of_its_p and upper(n * wasted / seen, n, z) <= AUTO_WASTE_GOAL:
            approve = min(max(x, math.nextafter(BAND_FLOOR, 1.0)), BAND_CEILING)
    deny, good = BAND_FLOOR, 0.0
    low = ranked[::-1]
    for i, (x, w, k) in enumerate(low):
        good += k * (not w)
        if upper(n_all * good / total, n_all, z) > GOOD_DENIED_GOAL:
            break
        if i + 1 == len(low) or low[i + 1][0] != x:
            deny = x
    return max(BAND_FLOOR, min(deny, math.nextafter(approve, 0.0))), approve


def banded(
    p: float,
    deny: float,
    approve: float,
    policy: str,
    guard_share: float | None = None,
    auto_deny: bool = True,
) -> CouncilDecision:
    """A decision from a probability and a band (no members: a single model), in
    council.voting.combine's order: denied at or below `deny` (asked of a human instead
    without `auto_deny`) before approved at or above `approve`; approved with guardrails
    from `guard_share` of the way between, where given, as a council's band is split
    (fleet.config.CouncilSettings.guard)."""
    guard = approve if guard_share is None else deny + guard_share * (approve - deny)
    outcome = (
        CouncilOutcome.DENIED
        if p <= deny and auto_deny
        else CouncilOutcome.APPROVED
        if p >= approve
        else CouncilOutcome.GUARDED
        if p >= guard
        else CouncilOutcome.SPLIT
    )
    return CouncilDecision(
        outcome=outcome,
        probability=p,
        votes=[],
        quorum=0,
        policy=policy,
        summary=f"{outcome.value} at p={p:.2f}",
    )

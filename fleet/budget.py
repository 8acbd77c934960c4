"""Budget arithmetic that makes overspending impossible by construction.

Every active allocation has a deadline, and it is charged at most price x GPUs x (deadline -
start). Admission requires spent + the worst case of every active allocation + the new one to
fit the budget. When a budget is lowered, deadlines move earlier to the moment the project's
combined spend would reach it, and the monitor releases each allocation there.
"""

from __future__ import annotations

from dataclasses import dataclass

EPS = 1e-9


@dataclass(frozen=True)
class Running:
    id: str
    rate_usd_per_s: float
    started_at: float
    ends_at: float


@dataclass(frozen=True)
class Moved:
    """An allocation whose deadline a budget change moved."""

    id: str
    before: float | None  # the deadline it had
    after: float  # the deadline it has now (its lease end when the budget no longer binds)

    @property
    def earlier(self) -> bool:
        return self.before is None or self.after < self.before


def describe_moves(moves: list[Moved]) -> str:
    """What a budget change did to running allocations, in words ('' if nothing)."""
    earlier = sum(m.earlier for m in moves)
    later = len(moves) - earlier
    parts = [f"{n} running allocation{'s' if n != 1 else ''} now end{'s' if n == 1 else ''} "
             f"{when}" for n, when in ((earlier, "earlier (the budget runs out before their "
                                        "lease)"), (later, "later (back towards their lease)"))
             if n]
    return "; ".join(parts)


def worst_case(items: list[Running]) -> float:
    """What the allocations cost if each runs to its deadline."""
    return sum(r.rate_usd_per_s * (r.ends_at - r.started_at) for r in items)


def accrued(items: list[Running], at: float) -> float:
    return sum(r.rate_usd_per_s * max(0.0, min(at, r.ends_at) - r.started_at) for r in items)


def cut_deadlines(items: list[Running], remaining_usd: float, now: float) -> dict[str, float]:
    """Deadlines so that the spend of `items` stays within `remaining_usd`.

    All allocations run until a common time T (or their own lease end, if earlier), where T
    solves accrued(T) = remaining. The caller guarantees accrued(now) <= remaining.
    """
    if accrued(items, max((r.ends_at for r in items), default=now)) <= remaining_usd + EPS:
        return {r.id: r.ends_at for r in items}
    # accrued() is piecewise linear and increasing in T; walk its breakpoints.
    points = sorted({now, *(r.ends_at for r in items if r.ends_at > now)})
    lo = now
    for hi in points:
        if accrued(items, hi) >= remaining_usd:
            rate = sum(r.rate_usd_per_s for r in items if r.ends_at > lo)
            t = lo + (remaining_usd - accrued(items, lo)) / rate if rate > 0 else lo
            cut = max(now, min(hi, t))
            return {r.id: min(r.ends_at, cut) for r in items}
        lo = hi
    return {r.id: r.ends_at for r in items}

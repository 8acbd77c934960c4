"""EASY backfill: the head of a blocked line gets a reservation; later requests start now only
if they do not delay it.

The reservation is the earliest time enough GPUs are free for the head, counting each running
allocation as ending at its deadline (what the ledger knows: an allocation never holds its GPUs
past it). A later request may start on GPUs free now if its lease ends by then, or if it fits
in the GPUs that are spare at that time beyond what the head needs (which it then uses up).
Lines are per GPU type, so a request for another type never delays this reservation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Ending:
    """GPUs of the line's type that a running allocation lets go at the latest at `at`."""

    at: float
    gpus: int


@dataclass(frozen=True)
class Reservation:
    """When the head of the line can start, and the GPUs free then beyond what it needs.
    `at` is infinite when what is known to end never frees enough GPUs (fewer usable GPUs of
    the type than it needs): the head then delays nobody."""

    at: float
    spare: int


def reserve(count: int, free: int, endings: Iterable[Ending], now: float) -> Reservation:
    """The earliest time `count` GPUs are free, from `free` now and the `endings` to come
    (an ending already past its time counts as now: its release is under way)."""
    ordered = sorted(endings, key=lambda e: e.at)
    available, at = free, now
    for e in ordered:
        if available >= count:
            break
        available, at = available + e.gpus, max(now, e.at)
    if available < count:
        return Reservation(math.inf, 0)
    spare = free + sum(e.gpus for e in ordered if e.at <= at) - count
    return Reservation(at, spare)


def backfill(count: int, ends_at: float, reservation: Reservation) -> Reservation | None:
    """The reservation left if `count` GPUs free now are taken until `ends_at`; None if that
    would delay the head's start."""
    if ends_at <= reservation.at:
        return reservation  # back before the head needs them
    if count <= reservation.spare:
        return Reservation(reservation.at, reservation.spare - count)
    return None

"""From what the council reads to tensors: one irregularly timed sequence per request.

The sequence is [older-history summary?] + past allocations (oldest first) + the request.
dt, the time since the previous step, is in days and capped at 60: raw seconds would
saturate the time gates. Inputs are split by how they may move the vote:
- `free` features (sizes, cost, fleet load, timing) reach the recurrent cell;
- `bad` features (released for idling, stopped by the budget, utilisation deficit; and of the
  request: cost pressure, 1 - fair share, its share of the pool, the pool's load, asking for
  training hardware for other work) reach the output only through non-negative weights, so
  a worse record can never raise approval (monotone by construction, see council/torch_net.py).

The encoder is numpy, so that a decision (council/inference.py) never imports torch; `encode`
hands the same arrays to torch for the network and training.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from council.features import RequestFeatures
from fleet.errors import InvalidInput
from fleet.models import ReleaseReason

if TYPE_CHECKING:
    from numpy.typing import NDArray
    from torch import Tensor

DAY = 86400.0
MAX_DT_DAYS = 60.0
SEQ_FREE = ("gpus", "hours", "gpu_hours", "cost", "fleet_busy", "rated", "is_request", "is_summary")
SEQ_BAD = ("hoarded_share", "budget_release", "util_deficit")
STATIC_FREE = (
    "budgeted",
    "worst_case_usd",
    "usage_share",
    "priority",
    "count",
    "duration",
    "history_len",
)
# each can only count against a request: monotone by construction
STATIC_BAD = ("cost_pressure", "unfair_share", "pool_share", "pool_busy", "purpose_mismatch")

A = TypeVar("A", "NDArray[Any]", "Tensor")  # numpy arrays, or torch tensors over them


@dataclass
class Encoded(Generic[A]):
    free: A  # (B, T, len(SEQ_FREE)) float32
    bad: A  # (B, T, len(SEQ_BAD)) float32
    dt: A  # (B, T) float32, days since the previous step
    mask: A  # (B, T) bool: True for real steps; padding comes first
    static_free: A  # (B, len(STATIC_FREE)) float32
    static_bad: A  # (B, len(STATIC_BAD)) float32

    def __len__(self) -> int:
        return int(self.free.shape[0])

    def take(self, index: A | list[int]) -> Encoded[A]:
        """The rows at `index`, copied (numpy and torch both copy on integer indexing)."""
        return Encoded(*(getattr(self, f)[index] for f in _FIELDS))


_FIELDS = ("free", "bad", "dt", "mask", "static_free", "static_bad")
_PAST, _REQUEST, _SUMMARY = 0.0, 1.0, 2.0
_CUT_BY_BUDGET = frozenset(r for r in ReleaseReason if r.cut_by_budget)
# what is read of each past job, and of each request (its step, then its static inputs),
# as one tuple per item: a few numpy calls a batch rather than a few per column
_JOB_OF = operator.attrgetter(
    "ended_at", "count", "hours", "cost_usd", "fleet_busy", "hoarded_hours"
)
_REQUEST_OF = operator.attrgetter(
    "now",
    "count",
    "hours",
    "worst_case_usd",
    "pool_busy",
    "budgeted",
    "usage_share",
    "priority",
    "history_len",
    "cost_pressure",
    "fair_share",
    "pool_share",
    "purpose_mismatch",
)
_UTIL_OF, _REASON_OF = operator.attrgetter("util_pct"), operator.attrgetter("reason")


def _values(
    items: Sequence[object], of: operator.attrgetter[Any], width: int
) -> NDArray[np.float64]:
    """(len(items), width): `of`'s values of each item, in one pass (numpy reads the tuples
    as a flat stream several times faster than as rows)."""
    flat = itertools.chain.from_iterable(map(of, items))
    return np.fromiter(flat, np.float64, width * len(items)).reshape(len(items), width)


def _raw(
    batch: Sequence[RequestFeatures],
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]:
    """One row per step, each request's steps in turn: time, count, hours, GPU-hours, cost,
    fleet busy, utilisation (NaN: unknown), hoarded share (held idle with no work left),
    budget share, kind; the number of steps of each request; and each request's _REQUEST_OF
    values. Column by column over the whole batch: a request's past allocations are most of
    the work."""
    n = len(batch)
    jobs = list(itertools.chain.from_iterable(f.past for f in batch))
    n_past = np.fromiter((len(f.past) for f in batch), np.int64, n)
    summarised = [i for i, f in enumerate(batch) if f.older is not None and f.older.events]
    has_summary = np.zeros(n, dtype=np.int64)
    has_summary[summarised] = 1
    lengths = has_summary + n_past + 1
    first = np.cumsum(lengths) - lengths  # flat index of each request's first step
    raw = np.empty((int(lengths.sum()), 10))

    owner = np.repeat(np.arange(n), n_past)
    at = np.arange(len(jobs)) + (first + has_summary - (np.cumsum(n_past) - n_past))[owner]
    job = _values(jobs, _JOB_OF, 6)
    count, hours, hoarded = job[:, 1], job[:, 2], job[:, 5]
    past = np.empty((len(jobs), 10))
    past[:, :3] = job[:, :3]
    past[:, 3] = count * hours
    past[:, 4:6] = job[:, 3:5]
    past[:, 6] = np.array(list(map(_UTIL_OF, jobs)), dtype=np.float64)  # None: NaN
    past[:, 7] = np.divide(hoarded, hours, out=np.zeros_like(hours), where=hours > 0)
    past[:, 8] = np.fromiter(map(_CUT_BY_BUDGET.__contains__, map(_REASON_OF, jobs)), np.bool_)
    past[:, 9] = _PAST
    raw[at] = past
    request = _values(batch, _REQUEST_OF, 13)
    step = np.empty((n, 10))  # the request itself
    step[:, :3] = request[:, :3]
    step[:, 3] = request[:, 1] * request[:, 2]
    step[:, 4:6] = request[:, 3:5]
    step[:, 6:] = (math.nan, 0.0, 0.0, _REQUEST)
    raw[first + lengths - 1] = step
    for i in summarised:  # the older history's summary, first
        raw[first[i]] = _summary(batch[i])
    return raw, lengths, request


def _summary(f: RequestFeatures) -> tuple[float, ...]:
    """The step of the older history's summary (_raw's columns)."""
    older = f.older
    assert older is not None
    rated = older.rated_gpu_hours
    share = older.gpu_hours or 1.0
    return (
        # at the oldest event read one by one (its datetime may round a microsecond later)
        f.past[0].ended_at if f.past else older.at.timestamp(),
        older.events,
        0.0,
        older.gpu_hours,
        0.0,
        0.0,
        older.util_gpu_hours / rated if rated > 0 else math.nan,
        older.idle_gpu_hours / share,
        older.budget_gpu_hours / share,
        _SUMMARY,
    )


def _rows_one(f: RequestFeatures) -> list[tuple[float, ...]]:
    """_raw's rows of one request, in Python: the same operations on the same doubles as
    _raw's columns, so the same values, bit for bit."""
    rows = [_summary(f)] if f.older is not None and f.older.events else []
    rows += [
        (
            j.ended_at,
            j.count,
            j.hours,
            j.count * j.hours,
            j.cost_usd,
            j.fleet_busy,
            math.nan if j.util_pct is None else j.util_pct,
            j.hoarded_hours / j.hours if j.hours > 0 else 0.0,
            j.reason in _CUT_BY_BUDGET,
            _PAST,
        )
        for j in f.past
    ]
    request = (f.now, f.count, f.hours, f.count * f.hours, f.worst_case_usd, f.pool_busy)
    rows.append((*request, math.nan, 0.0, 0.0, _REQUEST))
    return rows


def _scale(x: NDArray[np.float64], log_top: float | NDArray[np.float64]) -> NDArray[np.float64]:
    return np.log1p(np.maximum(x, 0.0)) / log_top


# log1p of the scales' tops: GPUs (events, for the summary), hours, GPU-hours, cost (USD)
_LOG_TOPS = np.array([math.log1p(top) for top in (64, 720, 1e4, 1e5)])


def _out_of_order(times: Sequence[float] | NDArray[np.float64], at: int) -> InvalidInput:
    return InvalidInput(
        "the council's history must be in time order: an event at "
        f"{float(times[at]):.0f} follows one at {float(times[at - 1]):.0f}"
    )


def _encode_one(f: RequestFeatures) -> Encoded[NDArray[Any]]:
    """encode_arrays of one request, step by step in Python: a decision's request has a few
    dozen steps, and numpy's calls, each dearer than a step's arithmetic, are what would
    cost. The same operations on the same doubles as encode_arrays' columns (the scales'
    log1p through numpy too), so the same arrays, bit for bit."""
    rows = _rows_one(f)
    n = len(rows)
    flat = itertools.chain.from_iterable(r[1:5] for r in rows)  # GPUs, hours, GPU-hours, cost
    scaled = _scale(np.fromiter(flat, np.float64, 4 * n).reshape(n, 4), _LOG_TOPS).tolist()
    free: list[float] = []
    bad: list[float] = []
    dt: list[float] = []
    for k, (r, logs) in enumerate(zip(rows, scaled, strict=True)):
        gap = r[0] - rows[k - 1][0] if k else 0.0
        if gap < 0:
            raise _out_of_order([r[0] for r in rows], k)
        util = r[6]
        rated = util == util  # not NaN
        free += logs
        free += (r[5], rated, r[9] == _REQUEST, r[9] == _SUMMARY)
        bad += (r[7], r[8], 1 - util / 100 if rated else 0.0)
        dt.append(min(gap / DAY, MAX_DT_DAYS))
    count, hours, _, worst = scaled[-1]  # the request's step: its count, hours and cost scaled
    static_free = (
        f.budgeted,
        worst,
        f.usage_share,
        f.priority,
        count,
        hours,
        min(f.history_len, 256) / 256,
    )
    static_bad = (
        min(f.cost_pressure, 10.0),
        1.0 - f.fair_share,
        f.pool_share,
        f.pool_busy,
        f.purpose_mismatch,
    )
    return Encoded(
        np.fromiter(free, np.float32, len(free)).reshape(1, n, len(SEQ_FREE)),
        np.fromiter(bad, np.float32, len(bad)).reshape(1, n, len(SEQ_BAD)),
        np.fromiter(dt, np.float32, n).reshape(1, n),
        np.ones((1, n), dtype=np.bool_),
        np.array([static_free], dtype=np.float32),
        np.array([static_bad], dtype=np.float32),
    )


def encode_arrays(batch: Sequence[RequestFeatures]) -> Encoded[NDArray[Any]]:
    """All requests in one pass; sequences are left-padded to the longest (one request:
    _encode_one)."""
    if len(batch) == 1:
        return _encode_one(batch[0])
    raw, lengths, request = _raw(batch)
    n, steps = len(batch), int(lengths.max())
    first = np.cumsum(lengths) - lengths  # flat index of each request's first step

    times = raw[:, 0]
    gap = np.zeros_like(times)
    gap[1:] = times[1:] - times[:-1]
    gap[first] = 0.0
    if bool((gap < 0).any()):
        raise _out_of_order(times, int(np.flatnonzero(gap < 0)[0]))
    kind, util = raw[:, 9], raw[:, 6]
    rated = ~np.isnan(util)
    step_free = np.empty((len(raw), len(SEQ_FREE)), dtype=np.float32)
    step_free[:, :4] = _scale(raw[:, 1:5], _LOG_TOPS)  # GPUs, hours, GPU-hours, cost
    step_free[:, 4] = raw[:, 5]
    step_free[:, 5] = rated
    step_free[:, 6] = kind == _REQUEST
    step_free[:, 7] = kind == _SUMMARY
    step_bad = np.empty((len(raw), len(SEQ_BAD)), dtype=np.float32)
    step_bad[:, :2] = raw[:, 7:9]
    step_bad[:, 2] = np.where(rated, 1 - util / 100, 0.0)
    step_dt = np.minimum(gap / DAY, MAX_DT_DAYS)

    if bool((lengths == steps).all()):  # nothing to pad: the steps are the batch's rows
        free = step_free.reshape(n, steps, len(SEQ_FREE))
        bad = step_bad.reshape(n, steps, len(SEQ_BAD))
        dt = step_dt.astype(np.float32).reshape(n, steps)
        mask = np.ones((n, steps), dtype=np.bool_)
    else:
        owner = np.repeat(np.arange(n), lengths)
        pos = np.arange(len(raw)) - first[owner] + (steps - lengths[owner])
        free = np.zeros((n, steps, len(SEQ_FREE)), dtype=np.float32)
        bad = np.zeros((n, steps, len(SEQ_BAD)), dtype=np.float32)
        dt = np.zeros((n, steps), dtype=np.float32)
        mask = np.zeros((n, steps), dtype=np.bool_)
        free[owner, pos] = step_free
        bad[owner, pos] = step_bad
        dt[owner, pos] = step_dt
        mask[owner, pos] = True
    # request: now, count, hours, worst_case_usd, pool_busy, then the static inputs (_REQUEST_OF)
    static_free = np.empty((n, len(STATIC_FREE)), dtype=np.float32)
    static_free[:, 0] = request[:, 5]  # budgeted
    static_free[:, 1] = _scale(request[:, 3], _LOG_TOPS[3])  # worst_case_usd
    static_free[:, 2:4] = request[:, 6:8]  # usage_share, priority
    static_free[:, 4:6] = _scale(request[:, 1:3], _LOG_TOPS[:2])  # count, duration
    static_free[:, 6] = np.minimum(request[:, 8], 256) / 256  # history_len
    static_bad = np.empty((n, len(STATIC_BAD)), dtype=np.float32)
    static_bad[:, 0] = np.minimum(request[:, 9], 10.0)  # cost_pressure
    static_bad[:, 1] = 1.0 - request[:, 10]  # unfair share
    static_bad[:, 2] = request[:, 11]  # pool_share
    static_bad[:, 3] = request[:, 4]  # pool_busy
    static_bad[:, 4] = request[:, 12]  # purpose_mismatch
    return Encoded(free, bad, dt, mask, static_free, static_bad)


def encode(batch: Sequence[RequestFeatures]) -> Encoded[Tensor]:
    """encode_arrays as torch tensors (sharing the arrays' memory), for the network."""
    import torch

    arrays = encode_arrays(batch)
    return Encoded(*(torch.from_numpy(getattr(arrays, f)) for f in _FIELDS))

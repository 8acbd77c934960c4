"""From what the council reads to tensors: one irregularly timed sequence per request.

The sequence is [older-history summary?] + past allocations (oldest first) + the request.
dt, the time since the previous step, is in days and not capped: a record fades as it ages
through the decays of the network (the CfC's time gates and the evidence accumulators, which
saturate without overflow over any gap), so a year-old record can be forgiven where a cap
would freeze it at the cap's age (it was 60 days: the shipped weights denied a hoarder whose
last idle release was 1,000 days old as they denied one of 60 days). Inputs are split by how
they may move the vote:
- `free` features (sizes, cost, fleet load, timing, the share of its lease an allocation
  held) reach the recurrent cell;
- `bad` features (held idle with no work left, stopped by the budget, the utilisation deficit
  and utilisation under the waste line, held on until its lease, the monitor or the budget
  ended it; and of the request: cost pressure, 1 - fair share,
  its share of the pool, the pool's load, asking for training hardware for other work) reach
  the output only through non-negative weights, so a worse record can never raise approval
  (monotone by construction, see council/torch_net.py).

Each group holds every input; a network reads the columns its spec names (council/spec.py),
so weights trained on fewer inputs (the `*_V1` groups) still load.

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
LOW_UTIL_PCT = 20.0  # council.dataset.WASTE_UTIL_PCT: under it an allocation was wasted
SEQ_FREE_V1 = (
    "gpus",
    "hours",
    "gpu_hours",
    "cost",
    "fleet_busy",
    "rated",
    "is_request",
    "is_summary",
)
# released by its holder (not by the lease's end, the monitor or the budget); the share of
# its lease it held (1 where the lease is unknown)
SEQ_FREE = (*SEQ_FREE_V1, "by_holder", "lease_used")
# what a council trained now reads: whether its holder released it enters as held_on (below),
# where it can only count against a request (a free input let the council that learned
# outcomes approve more where a holder's release became a budget cut)
SEQ_FREE_NOW = tuple(n for n in SEQ_FREE if n != "by_holder")
SEQ_BAD_V1 = ("hoarded_share", "budget_release", "util_deficit")
# utilisation under LOW_UTIL_PCT; held until its lease, the monitor or the budget ended it
SEQ_BAD = (*SEQ_BAD_V1, "low_util", "held_on")
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
STATIC_FREE_V1, STATIC_BAD_V1 = STATIC_FREE, STATIC_BAD
GROUPS = {
    "seq_free": SEQ_FREE,
    "seq_bad": SEQ_BAD,
    "static_free": STATIC_FREE,
    "static_bad": STATIC_BAD,
}

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
_PAST_OF, _UTIL_OF, _REASON_OF = (operator.attrgetter(a) for a in ("past", "util_pct", "reason"))
_CUT_BY_BUDGET = frozenset(r for r in ReleaseReason if r.cut_by_budget)
_BY_HOLDER = frozenset(
    {
        ReleaseReason.EXPLICIT,
        ReleaseReason.CONTEXT_EXIT,
        ReleaseReason.COMMAND_EXIT,
        ReleaseReason.CANCELLED,
    }
)
# ended by the lease, the monitor or the budget, not by its holder: what held_on marks (a
# preemption, a GPU's fault or a job cancelled outside are no one's habit)
_HELD_ON = frozenset(
    {
        ReleaseReason.LEASE_EXPIRED,
        ReleaseReason.EXPIRED_WHILE_DOWN,
        ReleaseReason.IDLE,
        ReleaseReason.BUDGET,
    }
)


def _raw(batch: Sequence[RequestFeatures]) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """One row per step, each request's steps in turn: time, count, hours, GPU-hours, cost,
    fleet busy, utilisation (NaN: unknown), hoarded share (held idle with no work left),
    budget share, kind, released by its holder, share of the lease held, held on; and the
    number of steps of each request. Column by column over the whole batch: a request's past
    allocations are most of the work (_rows_one: one request's, row by row)."""
    n = len(batch)
    jobs = list(itertools.chain.from_iterable(f.past for f in batch))
    n_past = np.fromiter(map(len, map(_PAST_OF, batch)), np.int64, n)
    summarised = [i for i, f in enumerate(batch) if f.older is not None and f.older.events]
    has_summary = np.zeros(n, dtype=np.int64)
    has_summary[summarised] = 1
    lengths = has_summary + n_past + 1
    first = np.cumsum(lengths) - lengths  # flat index of each request's first step
    raw = np.empty((int(lengths.sum()), 13))

    owner = np.repeat(np.arange(n), n_past)
    at = np.arange(len(jobs)) + (first + has_summary - (np.cumsum(n_past) - n_past))[owner]
    ended, count, hours, cost, busy, hoarded, lease = (
        _column(jobs, name)
        for name in (
            "ended_at",
            "count",
            "hours",
            "cost_usd",
            "fleet_busy",
            "hoarded_hours",
            "lease_hours",
        )
    )
    raw[at] = np.stack(
        [
            ended,
            count,
            hours,
            count * hours,
            cost,
            busy,
            np.array(list(map(_UTIL_OF, jobs)), dtype=np.float64),  # None: NaN
            np.divide(hoarded, hours, out=np.zeros_like(hours), where=hours > 0),
            np.fromiter(map(_CUT_BY_BUDGET.__contains__, map(_REASON_OF, jobs)), np.bool_),
            np.full(len(jobs), _PAST),
            np.fromiter(map(_BY_HOLDER.__contains__, map(_REASON_OF, jobs)), np.bool_),
            np.minimum(np.divide(hours, lease, out=np.ones_like(hours), where=lease > 0), 1.0),
            np.fromiter(map(_HELD_ON.__contains__, map(_REASON_OF, jobs)), np.bool_),
        ],
        axis=1,
    )
    count, hours = _column(batch, "count"), _column(batch, "hours")
    raw[first + lengths - 1] = np.stack(  # the request itself
        [
            _column(batch, "now"),
            count,
            hours,
            count * hours,
            _column(batch, "worst_case_usd"),
            _column(batch, "pool_busy"),
            np.full(n, math.nan),
            np.zeros(n),
            np.zeros(n),
            np.full(n, _REQUEST),
            np.zeros(n),
            np.zeros(n),
            np.zeros(n),
        ],
        axis=1,
    )
    for i in summarised:  # the older history's summary, first
        raw[first[i]] = _summary_row(batch[i])
    return raw, lengths


def _summary_row(f: RequestFeatures) -> tuple[float, ...]:
    """The step that summarises a request's older history (f.older, which has events)."""
    older = f.older
    assert older is not None
    rated, share = older.rated_gpu_hours, older.gpu_hours or 1.0
    return (
        # at the oldest event read one by one (its datetime may round a microsecond later)
        f.past[0].ended_at if f.past else older.at.timestamp(),
        older.events,
        0.0,
        older.gpu_hours,
        0.0,
        0.0,
        older.util_gpu_hours / rated if rated > 0 else math.nan,
        older.hoarded_gpu_hours / share,
        older.budget_gpu_hours / share,
        _SUMMARY,
        0.0,
        1.0,
        0.0,  # how the older allocations ended is summarised in their idle and budget shares
    )


def _column(items: Sequence[object], name: str) -> NDArray[np.float64]:
    return np.fromiter(map(operator.attrgetter(name), items), np.float64, len(items))


def _scale(x: NDArray[np.float64], top: float) -> NDArray[np.float64]:
    return np.log1p(np.maximum(x, 0.0)) / math.log1p(top)


_LOG_TOPS = np.array([math.log1p(top) for top in (64, 720, 1e4, 1e5)])


def _rows_one(f: RequestFeatures) -> list[tuple[float, ...]]:
    """_raw's rows of one request, in Python: the same operations on the same doubles as
    _raw's columns, so the same values, bit for bit."""
    rows = [_summary_row(f)] if f.older is not None and f.older.events else []
    for j in f.past:
        count, hours, lease = float(j.count), j.hours, j.lease_hours
        rows.append(
            (
                j.ended_at,
                count,
                hours,
                count * hours,
                j.cost_usd,
                j.fleet_busy,
                math.nan if j.util_pct is None else j.util_pct,
                j.hoarded_hours / hours if hours > 0 else 0.0,
                j.reason in _CUT_BY_BUDGET,
                _PAST,
                j.reason in _BY_HOLDER,
                min(hours / lease, 1.0) if lease > 0 else 1.0,
                j.reason in _HELD_ON,
            )
        )
    count = float(f.count)
    request = (f.now, count, f.hours, count * f.hours, f.worst_case_usd, f.pool_busy)
    rows.append((*request, math.nan, 0.0, 0.0, _REQUEST, 0.0, 0.0, 0.0))
    return rows


def _encode_one(f: RequestFeatures) -> Encoded[NDArray[Any]]:
    """encode_arrays of one request, step by step in Python: a decision's request has a few
    dozen steps, and numpy's calls, each dearer than a step's arithmetic, are what would
    cost. The same operations on the same doubles as encode_arrays' columns (the scales'
    log1p through numpy too), so the same arrays, bit for bit."""
    rows = _rows_one(f)
    n = len(rows)
    flat = itertools.chain.from_iterable(r[1:5] for r in rows)  # GPUs, hours, GPU-hours, cost
    logs = np.log1p(np.maximum(np.fromiter(flat, np.float64, 4 * n).reshape(n, 4), 0.0))
    scaled: list[list[float]] = (logs / _LOG_TOPS).tolist()
    free: list[float] = []
    bad: list[float] = []
    dt: list[float] = []
    for k, (r, sizes) in enumerate(zip(rows, scaled, strict=True)):
        gap = r[0] - rows[k - 1][0] if k else 0.0
        if gap < 0:
            raise _out_of_order([row[0] for row in rows], k)
        util = r[6]
        rated = not math.isnan(util)
        free += sizes
        free += (r[5], rated, r[9] == _REQUEST, r[9] == _SUMMARY, r[10], r[11])
        bad += (r[7], r[8], 1 - util / 100 if rated else 0.0, rated and util < LOW_UTIL_PCT, r[12])
        dt.append(gap / DAY)
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
        np.fromiter(free, np.float64, len(free)).astype(np.float32).reshape(1, n, len(SEQ_FREE)),
        np.fromiter(bad, np.float64, len(bad)).astype(np.float32).reshape(1, n, len(SEQ_BAD)),
        np.fromiter(dt, np.float64, n).astype(np.float32).reshape(1, n),
        np.ones((1, n), dtype=np.bool_),
        np.array([static_free], dtype=np.float64).astype(np.float32),
        np.array([static_bad], dtype=np.float64).astype(np.float32),
    )


def _out_of_order(times: Sequence[float] | NDArray[np.float64], at: int) -> InvalidInput:
    return InvalidInput(
        "the council's history must be in time order: an event at "
        f"{float(times[at]):.0f} follows one at {float(times[at - 1]):.0f}"
    )


def encode_arrays(batch: Sequence[RequestFeatures]) -> Encoded[NDArray[Any]]:
    """All requests in one pass; sequences are left-padded to the longest (one request, a
    decision's: _encode_one)."""
    if len(batch) == 1:
        return _encode_one(batch[0])
    raw, lengths = _raw(batch)
    n, steps = len(batch), int(lengths.max())
    owner = np.repeat(np.arange(n), lengths)
    first = np.cumsum(lengths) - lengths  # flat index of each request's first step
    pos = np.arange(len(raw)) - first[owner] + (steps - lengths[owner])

    times = raw[:, 0]
    gap = np.zeros_like(times)
    gap[1:] = times[1:] - times[:-1]
    gap[first] = 0.0
    if bool((gap < 0).any()):
        raise _out_of_order(times, int(np.flatnonzero(gap < 0)[0]))
    kind, util = raw[:, 9], raw[:, 6]
    rated = ~np.isnan(util)
    summary = kind == _SUMMARY
    step_free = np.stack(
        [
            _scale(raw[:, 1], 64),  # GPUs (events, for the summary)
            _scale(raw[:, 2], 720),
            _scale(raw[:, 3], 1e4),
            _scale(raw[:, 4], 1e5),
            raw[:, 5],
            rated,
            kind == _REQUEST,
            summary,
            raw[:, 10],
            raw[:, 11],
        ],
        axis=1,
    ).astype(np.float32)
    step_bad = np.stack(
        [
            raw[:, 7],
            raw[:, 8],
            np.where(rated, 1 - util / 100, 0.0),
            rated & (np.nan_to_num(util) < LOW_UTIL_PCT),
            raw[:, 12],
        ],
        axis=1,
    ).astype(np.float32)

    free = np.zeros((n, steps, len(SEQ_FREE)), dtype=np.float32)
    bad = np.zeros((n, steps, len(SEQ_BAD)), dtype=np.float32)
    dt = np.zeros((n, steps), dtype=np.float32)
    mask = np.zeros((n, steps), dtype=np.bool_)
    free[owner, pos] = step_free
    bad[owner, pos] = step_bad
    dt[owner, pos] = gap / DAY
    mask[owner, pos] = True
    static_free = np.stack(
        [
            _column(batch, "budgeted"),
            _scale(_column(batch, "worst_case_usd"), 1e5),
            _column(batch, "usage_share"),
            _column(batch, "priority"),
            _scale(_column(batch, "count"), 64),
            _scale(_column(batch, "hours"), 720),
            np.minimum(_column(batch, "history_len"), 256) / 256,
        ],
        axis=1,
    ).astype(np.float32)
    static_bad = np.stack(
        [
            np.minimum(_column(batch, "cost_pressure"), 10.0),
            1.0 - _column(batch, "fair_share"),
            _column(batch, "pool_share"),
            _column(batch, "pool_busy"),
            _column(batch, "purpose_mismatch"),
        ],
        axis=1,
    ).astype(np.float32)
    return Encoded(free, bad, dt, mask, static_free, static_bad)


def encode(batch: Sequence[RequestFeatures]) -> Encoded[Tensor]:
    """encode_arrays as torch tensors (sharing the arrays' memory), for the network."""
    import torch

    arrays = encode_arrays(batch)
    return Encoded(*(torch.from_numpy(getattr(arrays, f)) for f in _FIELDS))

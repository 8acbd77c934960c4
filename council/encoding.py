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

import array
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from council.features import RequestFeatures
from fleet.errors import InvalidInput

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


def _log(x: float, top: float) -> float:
    """log1p scaled so that `top` maps to 1."""
    return math.log1p(max(0.0, x)) / math.log1p(top)


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


def _raw(f: RequestFeatures) -> list[tuple[float, ...]]:
    """One row per step: time, count, hours, GPU-hours, cost, fleet busy, utilisation (NaN:
    unknown), hoarded share (held idle with no work left), budget share, kind."""
    rows: list[tuple[float, ...]] = []
    older = f.older
    if older is not None and older.events:
        rated = older.rated_gpu_hours
        share = older.gpu_hours or 1.0
        # at the oldest event read one by one (its datetime may round a microsecond later)
        rows.append(
            (
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
        )
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
            float(j.reason.cut_by_budget),
            _PAST,
        )
        for j in f.past
    ]
    rows.append(
        (
            f.now,
            f.count,
            f.hours,
            f.count * f.hours,
            f.worst_case_usd,
            f.pool_busy,
            math.nan,
            0.0,
            0.0,
            _REQUEST,
        )
    )
    return rows


def _scale(x: NDArray[np.float64], top: float) -> NDArray[np.float64]:
    return np.log1p(np.maximum(x, 0.0)) / math.log1p(top)


def encode_arrays(batch: Sequence[RequestFeatures]) -> Encoded[NDArray[Any]]:
    """All requests in one pass; sequences are left-padded to the longest."""
    per = [_raw(f) for f in batch]
    lengths = np.array([len(r) for r in per])
    flat = array.array("d", itertools.chain.from_iterable(itertools.chain.from_iterable(per)))
    raw = np.frombuffer(flat, dtype=np.float64).reshape(-1, len(per[0][0]))
    n, steps = len(per), int(lengths.max())
    owner = np.repeat(np.arange(n), lengths)
    first = np.cumsum(lengths) - lengths  # flat index of each request's first step
    pos = np.arange(len(raw)) - first[owner] + (steps - lengths[owner])

    times = raw[:, 0]
    gap = np.zeros_like(times)
    gap[1:] = times[1:] - times[:-1]
    gap[first] = 0.0
    if bool((gap < 0).any()):
        at = int(np.flatnonzero(gap < 0)[0])
        raise InvalidInput(
            "the council's history must be in time order: an event at "
            f"{float(times[at]):.0f} follows one at {float(times[at - 1]):.0f}"
        )
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
        ],
        axis=1,
    ).astype(np.float32)
    step_bad = np.stack(
        [raw[:, 7], raw[:, 8], np.where(rated, 1 - util / 100, 0.0)], axis=1
    ).astype(np.float32)

    free = np.zeros((n, steps, len(SEQ_FREE)), dtype=np.float32)
    bad = np.zeros((n, steps, len(SEQ_BAD)), dtype=np.float32)
    dt = np.zeros((n, steps), dtype=np.float32)
    mask = np.zeros((n, steps), dtype=np.bool_)
    free[owner, pos] = step_free
    bad[owner, pos] = step_bad
    dt[owner, pos] = np.minimum(gap / DAY, MAX_DT_DAYS)
    mask[owner, pos] = True
    static_free = np.array(
        [
            [
                float(f.budgeted),
                _log(f.worst_case_usd, 1e5),
                f.usage_share,
                f.priority,
                _log(f.count, 64),
                _log(f.hours, 720),
                min(f.history_len, 256) / 256,
            ]
            for f in batch
        ],
        dtype=np.float32,
    )
    static_bad = np.array(
        [
            [
                min(f.cost_pressure, 10.0),
                1.0 - f.fair_share,
                f.pool_share,
                f.pool_busy,
                f.purpose_mismatch,
            ]
            for f in batch
        ],
        dtype=np.float32,
    )
    return Encoded(free, bad, dt, mask, static_free, static_bad)


def encode(batch: Sequence[RequestFeatures]) -> Encoded[Tensor]:
    """encode_arrays as torch tensors (sharing the arrays' memory), for the network."""
    import torch

    arrays = encode_arrays(batch)
    return Encoded(*(torch.from_numpy(getattr(arrays, f)) for f in _FIELDS))

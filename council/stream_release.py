"""When to release an idle allocation, read from its utilisation stream: the model of
council/stream.py that tells a pause from an ending, in numpy (the monitor never imports torch).

Once in an idle stretch where no command is known, the monitor asks after how long it
should release: the first tick (every TICK_HOURS, at most MAX_WAIT_HOURS) at which the
model's chance that the work is over reaches the threshold shipped with the weights. The
threshold was chosen on the trace's jobs to cut no more pauses than the fleet's own rule
(`sim/idle_stream.py`, `train_release`), so the model trades no more work for the tails it
does not hold.

The shipped weights (`council/weights/stream.npz`) are a GRU: it held less of the tails than
the CfC at as many cuts on the same jobs (docs/decisions.md, "Pause or ending"). They learned
the simulator's jobs, whose pauses and leases `sim/workload.py` draws; on a real cluster's
streams the same threshold may cut more or fewer pauses.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from council.weightfiles import write_arrays
from fleet.errors import ConfigError

TICK_HOURS = 5 / 60  # how often the chance is asked, as the idle stretch goes on
MAX_WAIT_HOURS = 4.0  # released by then whatever the model says
WEIGHTS = Path(__file__).resolve().parent / "weights" / "stream.npz"
ARRAYS = ("core.w_in", "core.w_rec", "core.b", "head.weight", "head.bias")

Stretch = tuple[float, float]  # (utilisation %, hours) at one level, idle (0 %) or working


@dataclass(frozen=True)
class Query:
    """An idle stretch `idle_hours` long so far, after `before`: (utilisation %, hours) per
    stretch since the allocation started, on a lease of `lease_hours`."""

    before: tuple[Stretch, ...]
    idle_hours: float
    lease_hours: float


def sequence(q: Query) -> tuple[list[list[float]], list[float]]:
    """The query as steps: per stretch (and the idle one so far, last) its utilisation as a
    share, log(1 + hours) and the share of the lease gone when it ended; and each step's
    time step, its hours."""
    steps, dts, t = [], [], 0.0
    for util, hours in (*q.before, (0.0, q.idle_hours)):
        t += hours
        steps.append([util / 100.0, math.log1p(hours), min(t / q.lease_hours, 4.0)])
        dts.append(hours)
    return steps, dts


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = np.exp(-np.logaddexp(0.0, -x))
    return out


class Release:
    """The shipped GRU (one member of council/cfc.py's GRU, a linear read-out) and its
    threshold: the idle time after which an allocation is released."""

    def __init__(self, state: Mapping[str, NDArray[Any]], threshold: float) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("the threshold must be in (0, 1]")
        self.w_in = state["core.w_in"][0].astype(np.float64)  # (3, 3H)
        self.w_rec = state["core.w_rec"][0].astype(np.float64)  # (H, 3H)
        self.b = state["core.b"][0, 0].astype(np.float64)  # (3H,)
        self.head_w = state["head.weight"][0].astype(np.float64)  # (H,)
        self.head_b = float(state["head.bias"][0])
        self.hidden = self.w_rec.shape[0]
        self.threshold = threshold
        ticks = np.arange(1, round(MAX_WAIT_HOURS / TICK_HOURS) + 1) * TICK_HOURS
        self.ticks = ticks  # the idle times asked, in hours

    def _step(self, h: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
        """torch's GRU cell as council/cfc.py runs it: h (B, H), x (B, 3)."""
        hid = self.hidden
        xp = x @ self.w_in + self.b
        hp = h @ self.w_rec
        r = _sigmoid(xp[:, :hid] + hp[:, :hid])
        z = _sigmoid(xp[:, hid : 2 * hid] + hp[:, hid : 2 * hid])
        n = np.tanh(xp[:, 2 * hid :] + r * hp[:, 2 * hid :])
        out: NDArray[np.float64] = n + z * (h - n)
        return out

    def chances(self, before: Sequence[Stretch], lease_hours: float) -> NDArray[np.float64]:
        """The chance that the work is over at each tick of an idle stretch after `before`:
        the stream before it is read once, the idle step at every tick in one batch."""
        if not lease_hours > 0:
            raise ValueError("the lease must be longer than 0 hours")
        h = np.zeros((1, self.hidden))
        t = 0.0
        for util, hours in before:
            t += hours
            x = np.array([[util / 100.0, math.log1p(hours), min(t / lease_hours, 4.0)]])
            h = self._step(h, x)
        idle = np.stack(
            [
                np.zeros_like(self.ticks),
                np.log1p(self.ticks),
                np.minimum((t + self.ticks) / lease_hours, 4.0),
            ],
            axis=1,
        )
        last = self._step(np.repeat(h, len(self.ticks), axis=0), idle)
        return _sigmoid(last @ self.head_w + self.head_b)

    def after(self, before: Sequence[Stretch], lease_hours: float) -> float:
        """Hours of idling after which to release: the first tick whose chance reaches the
        threshold, MAX_WAIT_HOURS where none does."""
        reached = np.flatnonzero(self.chances(before, lease_hours) >= self.threshold)
        return float(self.ticks[reached[0]]) if len(reached) else MAX_WAIT_HOURS


def save(path: Path, state: Mapping[str, NDArray[Any]], threshold: float, meta: Any) -> None:
    """The GRU's arrays, its threshold and how both were chosen (`meta`, JSON); refused
    (ValueError) where they would not load."""
    Release(state, threshold)
    header = {"threshold": threshold, "meta": meta}
    write_arrays(
        path, {"header": np.array(json.dumps(header))} | {f"state/{k}": state[k] for k in ARRAYS}
    )


def read(path: Path) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
    with np.load(path, allow_pickle=False) as z:
        header: dict[str, Any] = json.loads(str(z["header"]))
        return header, {k: z[f"state/{k}"] for k in ARRAYS}


@cache
def shipped(path: Path | None = None) -> Release:
    """The release model a fleet with `[monitor] idle_release = "stream"` uses, read once and
    asked once: a file that cannot answer fails here, in one line (ConfigError), not at a
    monitor's tick while GPUs are held. `path`: WEIGHTS, where none is given."""
    path = WEIGHTS if path is None else path
    try:
        header, state = read(path)
        model = Release(state, float(header["threshold"]))
        model.after((), 1.0)
    except (OSError, EOFError, LookupError, TypeError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"cannot load the stream release model from {path}: {e}") from None
    return model

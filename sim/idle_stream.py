"""Pause or ending: the fixed idle timeout against models that read the utilisation stream
(council/stream.py), on the workload model's jobs.

A job's phases (sim/workload.py) are its stream: work at its utilisation, pauses, then the
idle tail. Each idle stretch, a pause or the tail, is an episode: from its start the GPUs
read 0 %, and a policy decides every TICK_HOURS whether to release them. Releasing in a
pause cuts it (the job is killed and queues again; a training job loses little, research
and inference start over); holding through a tail is GPUs hoarded. A fixed timeout
releases at T; the monitor's own rule with no command known (fleet.monitoring) at T but
never before 1.5 x the longest pause the stream came back from; a model at the first tick
where its chance that the work is over reaches a threshold (at MAX_WAIT_HOURS at the
latest).

The jobs are split by submission time, never at random: the models learn on the first
60 %, each threshold is chosen on the next 10 % to cut no more pauses there than the
timeout it is compared with, and the figures come from the last 30 %. The rules need no
training; they are judged on the same last 30 %.

What a model can learn here is what the workload model puts in the stream: how long jobs
work against the lease they asked for (users pad by a log-normal factor, median 2), how many
pauses came before and how long they were. On real streams those regularities may be weaker
or different; this is a comparison on the simulator's jobs, not a measurement of a cluster.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from numpy.typing import NDArray

from council.dataset import THRESHOLDS, TRAIN
from council.stream import KINDS, Kind, StreamNet, batch, fit, probabilities
from council.stream_release import MAX_WAIT_HOURS, TICK_HOURS, Query
from fleet.config import MonitorSettings
from fleet.models import Purpose
from fleet.monitoring import IdlePolicy, idle_limit_s
from sim.workload import SimJob

TIMEOUTS_MIN = (5, 10, 20, 30, 60, 120)  # the timeouts compared (the fleet's training: 30)
MATCHED_MIN = TIMEOUTS_MIN[1:]  # each model matched to these (5 min is the first tick)
TRAIN_TICKS = 6  # at most this many ticks of one episode among the training examples


@dataclass(frozen=True)
class Episode:
    query: Query  # the stream before the idle stretch (idle_hours 0)
    hours: float  # how long the idle stretch lasts
    ended: bool  # the tail: no work after it
    gpus: int
    submit: float
    purpose: Purpose = Purpose.TRAINING


def episodes(jobs: Sequence[SimJob]) -> list[Episode]:
    """Every idle stretch of every job, in submission order."""
    out = []
    for job in sorted(jobs, key=lambda j: (j.submit, j.id)):
        last_work = max((i for i, p in enumerate(job.phases) if p.work), default=-1)
        before: list[tuple[float, float]] = []
        for i, p in enumerate(job.phases):
            if not p.work:
                q = Query(tuple(before), 0.0, job.requested_hours)
                ended = i > last_work
                out.append(Episode(q, p.hours, ended, job.count, job.submit, job.purpose))
            before.append((p.util, p.hours))
    return out


def split(eps: Sequence[Episode]) -> tuple[list[Episode], list[Episode], list[Episode]]:
    """By submission time: the first 60 % of the span, the next 10 %, the last 30 %."""
    if not eps:
        return [], [], []
    start, end = eps[0].submit, eps[-1].submit
    cut1, cut2 = start + TRAIN * (end - start), start + THRESHOLDS * (end - start)
    return (
        [e for e in eps if e.submit < cut1],
        [e for e in eps if cut1 <= e.submit < cut2],
        [e for e in eps if e.submit >= cut2],
    )


def ticks(e: Episode) -> list[float]:
    """The idle times at which a policy is asked, while the stretch is still idle."""
    out, k = [], 1
    while k * TICK_HOURS < min(e.hours, MAX_WAIT_HOURS + 1e-9):
        out.append(k * TICK_HOURS)
        k += 1
    return out


def asked(e: Episode, idle: float) -> Query:
    return Query(e.query.before, idle, e.query.lease_hours)


def examples(eps: Sequence[Episode], seed: int) -> tuple[list[Query], list[float]]:
    """Training examples: up to TRAIN_TICKS ticks of each episode, labelled by its end."""
    rng = random.Random(seed)
    queries, labels = [], []
    for e in eps:
        got = ticks(e)
        for t in rng.sample(got, min(TRAIN_TICKS, len(got))):
            queries.append(asked(e, t))
            labels.append(float(e.ended))
    return queries, labels


@dataclass(frozen=True)
class Outcome:
    """What a policy did on a set of episodes."""

    pauses: int
    cut: int  # pauses released before they ended
    tail_gpu_hours: float  # all of the tails' GPU-hours
    held_gpu_hours: float  # of those, held before the release

    def figures(self) -> dict[str, float]:
        return {
            "pauses": self.pauses,
            "cut": self.cut,
            "cut_share": self.cut / self.pauses if self.pauses else 0.0,
            "tail_gpu_hours": round(self.tail_gpu_hours, 1),
            "held_gpu_hours": round(self.held_gpu_hours, 1),
            "held_share": self.held_gpu_hours / self.tail_gpu_hours if self.tail_gpu_hours else 0.0,
        }


def judge(eps: Sequence[Episode], release_at: Sequence[float]) -> Outcome:
    """Each episode released after `release_at` hours of idling (inf: held to its end)."""
    pauses = [e for e in eps if not e.ended]
    cut = sum(not e.ended and r < e.hours for e, r in zip(eps, release_at, strict=True))
    tails = [(e, r) for e, r in zip(eps, release_at, strict=True) if e.ended]
    return Outcome(
        len(pauses),
        cut,
        sum(e.gpus * e.hours for e, _ in tails),
        sum(e.gpus * min(e.hours, r) for e, r in tails),
    )


def timeout(eps: Sequence[Episode], minutes: float) -> list[float]:
    return [minutes / 60.0] * len(eps)


def monitor(eps: Sequence[Episode], minutes: float) -> list[float]:
    """The monitor's own rule with no command known (fleet.monitoring.idle_limit_s, with its
    timeout set to `minutes`): never shorter than pause_factor x the longest pause the
    stream came back from (fleet_rule with one timeout for every purpose)."""
    settings = MonitorSettings().model_copy(
        update={"idle_timeout_minutes": minutes, "idle_timeout_by_purpose": {}}
    )
    return fleet_rule(eps, settings)


def fleet_rule(eps: Sequence[Episode], settings: MonitorSettings) -> list[float]:
    """The fleet's own rule with no command known: its purpose's timeout, never shorter
    than pause_factor x the longest pause the stream came back from."""
    return [
        idle_limit_s(settings, IdlePolicy(e.purpose), 3600.0 * max(pauses(e), default=0.0)) / 3600.0
        for e in eps
    ]


def pauses(e: Episode) -> list[float]:
    """The hours of the pauses before the episode's idle stretch."""
    return [h for u, h in e.query.before if u <= 0]


class Scored:
    """A model's chance that the work is over at every tick of every episode, asked once."""

    def __init__(self, net: StreamNet, eps: Sequence[Episode]) -> None:
        queries, self.owner = [], []
        for i, e in enumerate(eps):
            for t in ticks(e):
                queries.append(asked(e, t))
                self.owner.append((i, t))
        self.p = probabilities(net, queries)
        self.n = len(eps)

    def release_at(self, threshold: float) -> list[float]:
        """The first tick at which p reaches `threshold`, else MAX_WAIT_HOURS."""
        out = [MAX_WAIT_HOURS] * self.n
        done = [False] * self.n
        for (i, t), p in zip(self.owner, self.p, strict=True):
            if not done[i] and p >= threshold:
                out[i], done[i] = t, True
        return out


def matched(scored: Scored, eps: Sequence[Episode], cuts: int) -> float:
    """The threshold that holds the least of the tails while cutting at most `cuts` pauses
    of `eps` (the lowest such threshold; 1.0, release at MAX_WAIT_HOURS, if none)."""
    grid = sorted({round(p, 4) for p in scored.p} | {1.0})
    lo, hi = 0, len(grid) - 1  # cuts fall as the threshold rises
    while lo < hi:
        mid = (lo + hi) // 2
        if judge(eps, scored.release_at(grid[mid])).cut <= cuts:
            hi = mid
        else:
            lo = mid + 1
    return grid[lo]


def compare(
    jobs: Sequence[SimJob],
    kinds: Sequence[Kind] = KINDS,
    seed: int = 0,
    steps: int = 600,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, object]:
    """Every fixed timeout against every model matched to it on the threshold slice: the
    figures on the test slice (Outcome.figures), per timeout and per model."""
    train, val, test = split(episodes(jobs))
    if not train or not val or not test:
        raise ValueError("too few jobs: every slice needs idle stretches")
    queries, labels = examples(train, seed)
    data, ended = batch(queries), torch.tensor(labels)
    rows: dict[str, dict[str, float]] = {}
    for rule in (timeout, monitor):
        for minutes in TIMEOUTS_MIN:
            rows[f"{rule.__name__} {minutes} min"] = judge(test, rule(test, minutes)).figures()
    for kind in kinds:
        log(f"training the {kind} on {len(queries):,} ticks of {len(train):,} idle stretches")
        net = fit(StreamNet(kind, seed), data, ended, steps, seed)
        on_val, on_test = Scored(net, val), Scored(net, test)
        for minutes in MATCHED_MIN:
            allowed = judge(val, timeout(val, minutes)).cut
            threshold = matched(on_val, val, allowed)
            got = judge(test, on_test.release_at(threshold)).figures()
            rows[f"{kind} as {minutes} min cuts"] = got | {"threshold": threshold}
    return {
        "episodes": {"train": len(train), "validation": len(val), "test": len(test)},
        "training_ticks": len(queries),
        "tick_minutes": TICK_HOURS * 60,
        "max_wait_hours": MAX_WAIT_HOURS,
        "policies": rows,
    }


def on_the_curve(got: Mapping[str, object], curve: Sequence[Mapping[str, object]]) -> float:
    """`got`'s tail GPU-hours held over what the timeouts hold at as many cuts (their
    figures on the same episodes, interpolated between the two nearest timeouts); nan
    where its cuts are outside the timeouts' range."""
    points = sorted((float(c["cut"]), float(c["held_gpu_hours"])) for c in curve)  # type: ignore[arg-type]
    x, held = float(got["cut"]), float(got["held_gpu_hours"])  # type: ignore[arg-type]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            y = y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
            return held / y if y > 0 else float("nan")
    return float("nan")


def train_release(
    jobs: Sequence[SimJob],
    settings: MonitorSettings,
    seed: int = 0,
    steps: int = 1500,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, NDArray[Any]], float, dict[str, object]]:
    """The GRU the monitor releases by (`[monitor] idle_release = "stream"`): trained on the
    first 60 % of the jobs' span, its threshold chosen on the next 10 % to cut no more
    pauses there than the fleet's own rule (`settings`), judged against that rule on the
    last 30 %. Returns its state (numpy arrays), the threshold and the figures."""
    train, val, test = split(episodes(jobs))
    if not train or not val or not test:
        raise ValueError("too few jobs: every slice needs idle stretches")
    queries, labels = examples(train, seed)
    log(f"training the gru on {len(queries):,} ticks of {len(train):,} idle stretches")
    net = fit(StreamNet("gru", seed), batch(queries), torch.tensor(labels), steps, seed)
    allowed = judge(val, fleet_rule(val, settings)).cut
    threshold = matched(Scored(net, val), val, allowed)
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    figures: dict[str, object] = {
        "episodes": {"train": len(train), "validation": len(val), "test": len(test)},
        "validation_cuts_allowed": allowed,
        "test": {
            "fleet rule": judge(test, fleet_rule(test, settings)).figures(),
            "gru": judge(test, Scored(net, test).release_at(threshold)).figures(),
        },
    }
    return state, threshold, figures

"""Pause or ending (sim/idle_stream.py, council/stream.py): a job's idle stretches as episodes,
the timeout and a threshold judged by hand, thresholds that keep their cut budget, and the
comparison seeded and split by time."""

from __future__ import annotations

import math

import pytest
import torch

from council.stream import StreamNet, batch, fit, probabilities
from council.stream_release import Query, sequence
from fleet.models import Purpose
from sim.idle_stream import (
    Episode,
    Scored,
    compare,
    episodes,
    judge,
    matched,
    monitor,
    on_the_curve,
    split,
    ticks,
    timeout,
)
from sim.workload import Phase, SimJob

T0 = 1_767_225_600.0


def job(i: int, phases: list[Phase], count: int = 2, lease: float = 8.0) -> SimJob:
    return SimJob(
        id=i,
        project="p",
        submit=T0 + i * 3600.0,
        count=count,
        purpose=Purpose.TRAINING,
        named_type=None,
        reference="A100",
        requested_hours=lease,
        pad=2.0,
        phases=tuple(phases),
    )


STORY = [Phase(2.0, 80.0), Phase(0.5, 0.0), Phase(1.0, 60.0), Phase(3.0, 0.0)]


def test_each_idle_stretch_is_an_episode_seen_from_its_start() -> None:
    pause, tail = episodes([job(0, STORY)])
    assert not pause.ended and pause.hours == 0.5 and pause.query.before == ((80.0, 2.0),)
    assert tail.ended and tail.hours == 3.0 and len(tail.query.before) == 3
    assert tail.gpus == 2 and tail.query.lease_hours == 8.0
    steps, dts = sequence(Query(tail.query.before, 0.25, 8.0))
    assert dts == [2.0, 0.5, 1.0, 0.25]
    assert steps[0] == pytest.approx([0.8, math.log1p(2.0), 0.25])
    assert steps[-1] == pytest.approx([0.0, math.log1p(0.25), 3.75 / 8.0])
    assert len(ticks(pause)) == 5  # 5, 10, ..., 25 minutes: still idle when asked


def test_a_timeout_cuts_the_pauses_it_outlasts_and_holds_the_tails_until_it() -> None:
    eps = episodes([job(0, STORY), job(1, [Phase(1.0, 90.0), Phase(0.1, 0.0)], count=4)])
    got = judge(eps, timeout(eps, 20))
    assert (got.pauses, got.cut) == (1, 1)  # the 30-minute pause
    assert got.tail_gpu_hours == pytest.approx(2 * 3.0 + 4 * 0.1)
    assert got.held_gpu_hours == pytest.approx(2 * 20 / 60 + 4 * 0.1)
    assert judge(eps, timeout(eps, 45)).cut == 0
    # the monitor's rule waits 1.5 x the 30-minute pause the first job came back from
    assert monitor(eps, 20) == pytest.approx([1 / 3, 0.75, 1 / 3])
    curve = [judge(eps, timeout(eps, m)).figures() for m in (20, 45)]
    assert on_the_curve(curve[0], curve) == pytest.approx(1.0)
    assert math.isnan(on_the_curve({"cut": 5, "held_gpu_hours": 1.0}, curve))


def test_the_split_is_by_submission_time() -> None:
    eps = episodes([job(i, STORY) for i in range(100)])
    train, val, test = split(eps)
    assert len(train) + len(val) + len(test) == len(eps)
    assert max(e.submit for e in train) < min(e.submit for e in val)
    assert max(e.submit for e in val) < min(e.submit for e in test)


def test_a_matched_threshold_cuts_no_more_pauses_than_allowed() -> None:
    eps = episodes([job(i, [Phase(1.0, 80.0), Phase(0.2 + i % 7 / 10, 0.0)]) for i in range(40)])
    net = fit(StreamNet("logistic"), batch([Query((), 0.1, 8.0)] * 2), torch.tensor([0.0, 1.0]))
    scored = Scored(net, eps)
    for allowed in (0, 3, 10):
        threshold = matched(scored, eps, allowed)
        assert judge(eps, scored.release_at(threshold)).cut <= allowed


def test_the_models_learn_a_stream_where_the_end_shows() -> None:
    """Jobs whose tail follows work at 90 % and whose pauses follow work at 30 %: every
    model tells them apart after one tick, where no timeout can."""
    jobs = []
    for i in range(120):
        jobs.append(job(i, [Phase(1.0, 30.0), Phase(1.0, 0.0), Phase(1.0, 90.0), Phase(2.0, 0.0)]))
    eps = episodes(jobs)
    queries = [Query(e.query.before, 1 / 12, 8.0) for e in eps]
    labels = torch.tensor([float(e.ended) for e in eps])
    for kind in ("cfc", "gru", "logistic"):
        net = fit(StreamNet(kind, seed=1), batch(queries), labels, steps=150, seed=1)
        p = probabilities(net, queries)
        assert all((x > 0.5) == e.ended for x, e in zip(p, eps, strict=True)), kind


def test_the_comparison_is_seeded_and_every_policy_reports() -> None:
    shape = [(1.0, 80.0), (0.1, 0.0), (1.0, 70.0), (0.5, 0.0)]
    jobs = [
        job(i, [Phase(h * (1 + (i + k) % 4), u) for k, (h, u) in enumerate(shape)])
        for i in range(60)
    ]
    got = compare(jobs, kinds=("cfc", "logistic"), steps=20)
    assert got == compare(jobs, kinds=("cfc", "logistic"), steps=20)
    rows = got["policies"]
    assert isinstance(rows, dict)
    assert "timeout 30 min" in rows and "cfc as 30 min cuts" in rows
    assert all(0 <= r["held_share"] <= 1 for r in rows.values())
    with pytest.raises(ValueError, match="too few jobs"):
        compare(jobs[:1])


def test_an_episode_with_no_work_before_it_reads_as_a_stream_of_one_step() -> None:
    (idle,) = episodes([job(0, [Phase(0.5, 0.0), Phase(1.0, 80.0)])])
    assert not idle.ended and idle.query.before == ()
    assert isinstance(idle, Episode)

"""The naive and slurm-like baselines on hand-built jobs, with answers worked out by hand, and
their invariants on the start of the real trace."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fleet.config import FleetConfig, load_fleet, parse_fleet
from fleet.models import Purpose
from fleet.trace import read_trace
from sim.baselines import run_naive, run_slurm_like
from sim.lifecycle import MAX_ATTEMPTS, Attempt
from sim.workload import Phase, SimJob, Workload, synthesize

Policy = Callable[[Workload, FleetConfig, Callable[[int], None] | None], list[Attempt]]
POLICIES: list[Policy] = [run_naive, run_slurm_like]
H = 3600.0
TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "philly.csv"

# SLOW: $1/h, throughput 1, 8 GPUs (the training pool's reference); FAST: $4/h, twice as fast,
# 4 GPUs. One training pool holds both, so slurm-like schedules them as one partition.
TINY = """
[catalog.SLOW]
memory_gb = 24
price_per_hour = 1.0
relative_throughput = 1.0

[catalog.FAST]
memory_gb = 80
price_per_hour = 4.0
relative_throughput = 2.0

[pools]
training = ["SLOW", "FAST"]
inference = ["SLOW"]
research = ["SLOW"]

[[nodes]]
name = "slow-0"
gpu_type = "SLOW"
gpus = 8

[[nodes]]
name = "fast-0"
gpu_type = "FAST"
gpus = 4
"""


def tiny(extra: str = "") -> FleetConfig:
    return parse_fleet(TINY + extra)


def job(id: int, submit: float, count: int, phases: Sequence[tuple[float, float]],
        requested: float, named: str | None = "FAST", project: str = "p",
        purpose: Purpose = Purpose.TRAINING, pad: float = 1.0) -> SimJob:
    """A job with (hours, util) phases measured on the named type (else SLOW)."""
    return SimJob(id=id, project=project, submit=submit, count=count, purpose=purpose,
                  named_type=named, reference=named or "SLOW", requested_hours=requested,
                  pad=pad, phases=tuple(Phase(h, u) for h, u in phases))


def run(policy: Policy, jobs: list[SimJob], config: FleetConfig | None = None) -> list[Attempt]:
    return policy(Workload(jobs), config or tiny(), None)


def by_job(attempts: list[Attempt]) -> dict[int, list[Attempt]]:
    out: dict[int, list[Attempt]] = defaultdict(list)
    for a in attempts:
        out[a.job].append(a)
    return {j: sorted(a, key=lambda x: x.attempt) for j, a in out.items()}


def spans(attempts: list[Attempt]) -> dict[int, tuple[float | None, float | None]]:
    """(start, end) of each job's only attempt."""
    assert len({a.job for a in attempts}) == len(attempts)
    return {a.job: (a.start, a.end) for a in attempts}


# ---- naive ------------------------------------------------------------------------------

HEAD_OF_LINE = [
    job(0, 0, 3, [(0.5, 80), (0.25, 0)], requested=1),  # 45 min of timeline, a 1 h lease
    job(1, 60, 2, [(1, 80)], requested=1),  # needs 2 FAST; 1 is free
    job(2, 120, 1, [(0.25, 80)], requested=0.5),  # fits in the free one, but queued behind
]


def test_naive_is_strict_fcfs_per_type_and_holds_the_whole_lease() -> None:
    out = run(run_naive, HEAD_OF_LINE)
    assert spans(out) == {0: (0, H), 1: (H, 2 * H), 2: (H, 1.5 * H)}
    assert [a.job for a in out] == [0, 2, 1]  # by end time
    first = out[0]
    assert (first.outcome, first.reason, first.gpu_type) == ("completed", "lease-expired", "FAST")
    assert first.cost_usd == 4.0 * 3 * 1.0
    assert first.held_gpu_hours == pytest.approx(3.0)
    # hoarded: the lease after the work was done, the idle tail included (3 x (1 - 0.5) h)
    assert first.hoarded_gpu_hours == pytest.approx(3 * 0.5)
    assert first.done_at == 0.5 * H
    assert all(a.reason == "lease-expired" and a.outcome == "completed" for a in out)


def test_naive_takes_the_dearest_type_that_can_hold_the_job() -> None:
    jobs = [job(0, 0, 2, [(2, 80)], requested=3, named=None),  # 2 h on SLOW, 1 h on FAST
            job(1, 0, 6, [(1, 80)], requested=1, named=None)]  # FAST has only 4 GPUs
    out = by_job(run(run_naive, jobs))
    dear, big = out[0][0], out[1][0]
    assert (dear.gpu_type, dear.start, dear.end, dear.done_at) == ("FAST", 0, 3 * H, H)
    assert dear.cost_usd == 4.0 * 2 * 3
    assert dear.hoarded_gpu_hours == pytest.approx(2 * 2.0)
    assert (big.gpu_type, big.end, big.cost_usd) == ("SLOW", H, 1.0 * 6 * 1)
    # slurm-like does no cost routing either, but takes the pool's first type that is free
    slurm = by_job(run(run_slurm_like, jobs))
    assert (slurm[0][0].gpu_type, slurm[0][0].end, slurm[0][0].cost_usd) == ("SLOW", 2 * H, 4.0)
    assert slurm[0][0].reason == "explicit"


# ---- slurm-like -------------------------------------------------------------------------


def test_slurm_like_ends_at_the_timeline_end_and_backfills_the_free_gpu() -> None:
    out = run(run_slurm_like, HEAD_OF_LINE)
    # 0 ends after its idle tail (45 min); 2 backfills at once (ends by the 1 h reservation)
    assert spans(out) == {0: (0, 0.75 * H), 1: (0.75 * H, 1.75 * H), 2: (120, 120 + 0.25 * H)}
    assert by_job(out)[0][0].cost_usd == 4.0 * 3 * 0.75
    assert {a.reason for a in out} == {"explicit"}


def test_backfill_never_delays_the_reserved_head_job() -> None:
    jobs = [
        job(0, 0, 3, [(1, 80)], requested=2),  # runs 0-1 h; walltime says until 2 h
        job(1, 10, 4, [(1, 80)], requested=1),  # the head: reserved all 4 FAST at 2 h
        job(2, 20, 1, [(0.25, 80)], requested=0.5),  # walltime ends by 2 h: backfills
        job(3, 1000, 1, [(0.5, 80)], requested=3),  # fits now, but would hold a reserved GPU
        job(4, 1100, 2, [(1, 80)], requested=2, named=None),  # SLOW: not reserved, starts
    ]
    out = spans(run(run_slurm_like, jobs))
    assert out == {0: (0, H), 1: (H, 2 * H), 2: (20, 20 + 0.25 * H),
                   3: (2 * H, 2.5 * H), 4: (1100, 1100 + H)}


def test_fair_share_puts_the_project_that_used_more_behind() -> None:
    jobs = [job(0, 0, 4, [(2, 80)], requested=2, project="heavy"),
            job(1, 100, 4, [(1, 80)], requested=1, project="heavy"),
            job(2, 200, 4, [(1, 80)], requested=1, project="light")]
    # at 2 h heavy has used 8 GPU-hours, light none: F = 0.25 against 1, age cannot make it up
    assert spans(run(run_slurm_like, jobs)) == {0: (0, 2 * H), 1: (3 * H, 4 * H),
                                                 2: (2 * H, 3 * H)}
    # naive serves them in arrival order
    assert spans(run(run_naive, jobs)) == {0: (0, 2 * H), 1: (2 * H, 3 * H), 2: (3 * H, 4 * H)}


def test_fair_share_counts_the_hours_of_running_allocations() -> None:
    jobs = [job(0, 0, 8, [(10, 80)], requested=10, named="SLOW", project="heavy"),
            job(1, 0, 4, [(1, 80)], requested=1, project="other"),
            job(2, 100, 4, [(1, 80)], requested=1, project="heavy"),
            job(3, 200, 4, [(1, 80)], requested=1, project="light")]
    # at 1 h heavy's running job has held 8 GPU-hours so far, more than other's finished 4
    out = spans(run(run_slurm_like, jobs))
    assert (out[2], out[3]) == ((2 * H, 3 * H), (H, 2 * H))


@pytest.mark.parametrize("policy", POLICIES, ids=["naive", "slurm-like"])
def test_walltime_kill_then_training_resumes_from_its_last_finished_work_phase(
        policy: Policy) -> None:
    # work 1 h, pause 30 min, work 1 h, idle 15 min; asks for 2 h: killed at 2 h mid-work
    j = job(0, 0, 2, [(1, 80), (0.5, 0), (1, 80), (0.25, 0)], requested=2)
    first, second = by_job(run(policy, [j]))[0]
    assert (first.outcome, first.reason, first.start, first.end) == (
        "killed", "lease-expired", 0, 2 * H)
    assert first.cost_usd == 4.0 * 2 * 2
    assert first.done_at is None
    # asked again at the kill: the second work phase and the tail (1.25 h), padded twice
    # (pad 1 -> 2 after a lease ran out): 2.5 h, rounded up to 3 h
    assert (second.attempt, second.submit, second.start, second.outcome) == (
        2, 2 * H, 2 * H, "completed")
    assert second.done_at == 3 * H
    if policy is run_naive:  # the whole 3 h lease
        assert (second.end, second.reason, second.cost_usd) == (5 * H, "lease-expired", 24.0)
    else:  # until the idle tail ends
        assert (second.end, second.reason, second.cost_usd) == (3.25 * H, "explicit", 10.0)


def test_research_starts_over_after_a_kill() -> None:
    j = job(0, 0, 1, [(1, 80), (0.5, 0), (1, 80)], requested=2, named=None,
            purpose=Purpose.RESEARCH)
    first, second = by_job(run(run_slurm_like, [j]))[0]
    assert (first.outcome, first.end) == ("killed", 2 * H)
    # all 2.5 h again, padded 2 x: 5 h, asked as 6 h; ends with its timeline
    assert (second.start, second.end, second.outcome, second.cost_usd) == (
        2 * H, 4.5 * H, "completed", 2.5)


@pytest.mark.parametrize("policy", POLICIES, ids=["naive", "slurm-like"])
def test_a_job_that_never_fits_its_lease_gives_up_after_max_attempts(policy: Policy) -> None:
    config = tiny("\n[limits]\nmax_duration_hours = 1\n")
    j = job(0, 0, 1, [(2, 80)], requested=1, named=None, purpose=Purpose.RESEARCH)
    done: list[int] = []
    out = policy(Workload([j]), config, done.append)
    assert [(a.attempt, a.start, a.end, a.outcome) for a in out] == [
        (n, (n - 1) * H, n * H, "killed") for n in range(1, MAX_ATTEMPTS + 1)]
    assert done == [1]


@pytest.mark.parametrize("policy", POLICIES, ids=["naive", "slurm-like"])
def test_a_job_larger_than_the_fleet_is_refused(policy: Policy) -> None:
    jobs = [job(0, 0, 16, [(1, 80)], requested=1, named=None),  # 8 SLOW, 4 FAST
            job(1, 5, 6, [(1, 80)], requested=1)]  # names FAST: 4 of them
    out = run(policy, jobs)
    assert [(a.job, a.outcome, a.reason, a.start, a.gpu_type, a.cost_usd) for a in out] == [
        (0, "unplaced", "more GPUs than the fleet has", None, None, 0.0),
        (1, "unplaced", "more GPUs than the fleet has", None, None, 0.0)]


# ---- both -------------------------------------------------------------------------------


def random_jobs(n: int, seed: int) -> list[SimJob]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        named = rng.choice(["FAST", "SLOW", None])
        phases = [(rng.uniform(0.1, 3), 80), (rng.uniform(0, 1), 0), (rng.uniform(0.1, 2), 50)]
        out.append(job(i, float(rng.randrange(0, 40) * 600), rng.choice([1, 1, 2, 4, 8]),
                       phases, requested=rng.choice([1, 2, 4, 8]), named=named,
                       project=rng.choice("abc"), purpose=rng.choice(list(Purpose))))
    return out


@pytest.mark.parametrize("policy", POLICIES, ids=["naive", "slurm-like"])
def test_same_jobs_same_attempts(policy: Policy) -> None:
    jobs = random_jobs(300, seed=7)
    first = run(policy, jobs)
    assert run(policy, jobs) == first
    assert run(policy, list(reversed(jobs))) == first
    check_invariants(first, jobs, tiny())


def check_invariants(out: list[Attempt], jobs: list[SimJob], config: FleetConfig) -> None:
    # in (end or submit, job, attempt) order
    keys = [(a.end if a.end is not None else a.submit, a.job, a.attempt) for a in out]
    assert keys == sorted(keys)
    # each job: attempts 1..k, every one but the last killed, a rerun asked at the kill
    tries = by_job(out)
    assert sorted(tries) == sorted(j.id for j in jobs)
    for attempts in tries.values():
        assert [a.attempt for a in attempts] == list(range(1, len(attempts) + 1))
        assert len(attempts) <= MAX_ATTEMPTS
        assert all(a.outcome == "killed" for a in attempts[:-1])
        assert all(b.submit == a.end for a, b in itertools.pairwise(attempts))
        assert attempts[-1].outcome in {"completed", "killed", "unplaced"}
    # never more GPUs of a type held than the fleet has (ends free before starts take)
    changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for a in out:
        if a.start is not None and a.end is not None and a.gpu_type is not None:
            assert a.submit <= a.start <= a.end
            changes[a.gpu_type] += [(a.start, a.count), (a.end, -a.count)]
            price = config.catalog[a.gpu_type].price_per_hour
            assert a.cost_usd == price * a.count * (a.end - a.start) / 3600.0
            assert a.cost_usd == pytest.approx(price * a.held_gpu_hours, rel=1e-9, abs=1e-9)
    for gpu_type, deltas in changes.items():
        held = 0
        for _, delta in sorted(deltas):
            held += delta
            assert 0 <= held <= config.gpus_of_type(gpu_type)


@pytest.mark.skipif(not TRACE.exists(), reason="the Philly trace is not in ../shared/traces")
@pytest.mark.parametrize("policy", POLICIES, ids=["naive", "slurm-like"])
def test_the_start_of_the_real_trace_keeps_the_invariants(policy: Policy) -> None:
    config = load_fleet(Path(__file__).resolve().parents[1] / "fleet" / "data" /
                        "trace_fleet.toml")
    workload = synthesize(read_trace(TRACE, limit=2000), config)
    done: list[int] = []
    out = policy(workload, config, done.append)
    check_invariants(out, workload.jobs, config)
    assert sum(done) == len(workload.jobs)
    assert sum(a.outcome == "completed" for a in out) > 0.9 * len(workload.jobs)
    if policy is run_naive:  # strict FCFS per type: an earlier request never starts later
        for gpu_type in config.catalog:
            mine = sorted((a.submit, a.start) for a in out
                          if a.gpu_type == gpu_type and a.start is not None)
            starts = [s for _, s in mine]
            assert starts == sorted(starts)
        assert {a.reason for a in out if a.start is not None} == {"lease-expired"}

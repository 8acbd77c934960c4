"""The baselines (naive, slurm-like, slurm-cheapest, slurm-batch, cheapest-first,
cheapest-autostop) on hand-built jobs, with
answers worked out by hand, and their invariants on the start of the real trace."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from fleet.config import FleetConfig, load_fleet, parse_fleet
from fleet.models import Purpose
from fleet.trace import read_trace
from sim.baselines import (
    _partitions,
    run_cheapest_autostop,
    run_cheapest_first,
    run_naive,
    run_slurm_batch,
    run_slurm_cheapest,
    run_slurm_like,
)
from sim.lifecycle import MAX_ATTEMPTS, Attempt
from sim.workload import Phase, SimJob, Workload, synthesize

Policy = Callable[[Workload, FleetConfig, Callable[[int], None] | None], list[Attempt]]
POLICIES: dict[str, Policy] = {
    "naive": run_naive,
    "slurm-like": run_slurm_like,
    "slurm-cheapest": run_slurm_cheapest,
    "slurm-batch": run_slurm_batch,
    "cheapest-first": run_cheapest_first,
    "cheapest-autostop": run_cheapest_autostop,
}
# an allocation ends by its lease at the latest
LEASED = ("naive", "slurm-like", "slurm-cheapest", "slurm-batch")
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


def on_sale() -> FleetConfig:
    """TINY with FAST at $1.50/h: dearer per hour than SLOW but cheaper per unit of work
    ($0.75 against $1), as an H100 is against an A100 in the trace fleet."""
    text = TINY.replace("price_per_hour = 4.0", "price_per_hour = 1.5")
    assert text != TINY
    return parse_fleet(text)


# A type in no pool: only a request that names it uses it, in a partition of its own.
EDGE = """
[catalog.EDGE]
memory_gb = 16
price_per_hour = 0.5
relative_throughput = 0.5

[[nodes]]
name = "edge-0"
gpu_type = "EDGE"
gpus = 1
"""


def policies(*names: str) -> pytest.MarkDecorator:
    """Run a test once per named policy (every policy when none is named), as `policy`."""
    chosen = names or tuple(POLICIES)
    return pytest.mark.parametrize("policy", [POLICIES[n] for n in chosen], ids=chosen)


def job(
    id: int,
    submit: float,
    count: int,
    phases: Sequence[tuple[float, float]],
    requested: float,
    named: str | None = "FAST",
    project: str = "p",
    purpose: Purpose = Purpose.TRAINING,
    pad: float = 1.0,
) -> SimJob:
    """A job with (hours, util) phases measured on the named type (else SLOW)."""
    return SimJob(
        id=id,
        project=project,
        submit=submit,
        count=count,
        purpose=purpose,
        named_type=named,
        reference=named or "SLOW",
        requested_hours=requested,
        pad=pad,
        phases=tuple(Phase(h, u) for h, u in phases),
    )


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
    jobs = [
        job(0, 0, 2, [(2, 80)], requested=3, named=None),  # 2 h on SLOW, 1 h on FAST
        job(1, 0, 6, [(1, 80)], requested=1, named=None),
    ]  # FAST has only 4 GPUs
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
    assert out == {
        0: (0, H),
        1: (H, 2 * H),
        2: (20, 20 + 0.25 * H),
        3: (2 * H, 2.5 * H),
        4: (1100, 1100 + H),
    }


def test_fair_share_puts_the_project_that_used_more_behind() -> None:
    jobs = [
        job(0, 0, 4, [(2, 80)], requested=2, project="heavy"),
        job(1, 100, 4, [(1, 80)], requested=1, project="heavy"),
        job(2, 200, 4, [(1, 80)], requested=1, project="light"),
    ]
    # at 2 h heavy has used 8 GPU-hours, light none: F = 0.25 against 1, age cannot make it up
    assert spans(run(run_slurm_like, jobs)) == {0: (0, 2 * H), 1: (3 * H, 4 * H), 2: (2 * H, 3 * H)}
    # naive and cheapest-first serve them in arrival order
    for policy in (run_naive, run_cheapest_first):
        assert spans(run(policy, jobs)) == {0: (0, 2 * H), 1: (2 * H, 3 * H), 2: (3 * H, 4 * H)}


def test_fair_share_counts_the_hours_of_running_allocations() -> None:
    jobs = [
        job(0, 0, 8, [(10, 80)], requested=10, named="SLOW", project="heavy"),
        job(1, 0, 4, [(1, 80)], requested=1, project="other"),
        job(2, 100, 4, [(1, 80)], requested=1, project="heavy"),
        job(3, 200, 4, [(1, 80)], requested=1, project="light"),
    ]
    # at 1 h heavy's running job has held 8 GPU-hours so far, more than other's finished 4
    out = spans(run(run_slurm_like, jobs))
    assert (out[2], out[3]) == ((2 * H, 3 * H), (H, 2 * H))


@policies(*LEASED)
def test_walltime_kill_then_training_resumes_from_its_last_finished_work_phase(
    policy: Policy,
) -> None:
    # work 1 h, pause 30 min, work 1 h, idle 15 min; asks for 2 h: killed at 2 h mid-work
    j = job(0, 0, 2, [(1, 80), (0.5, 0), (1, 80), (0.25, 0)], requested=2)
    first, second = by_job(run(policy, [j]))[0]
    assert (first.outcome, first.reason, first.start, first.end) == (
        "killed",
        "lease-expired",
        0,
        2 * H,
    )
    assert first.cost_usd == 4.0 * 2 * 2
    assert first.done_at is None
    # asked again at the kill: the second work phase and the tail (1.25 h), padded twice
    # (pad 1 -> 2 after a lease ran out): 2.5 h, rounded up to 3 h
    assert (second.attempt, second.submit, second.start, second.outcome) == (
        2,
        2 * H,
        2 * H,
        "completed",
    )
    assert second.done_at == 3 * H
    if policy is run_naive:  # the whole 3 h lease
        assert (second.end, second.reason, second.cost_usd) == (5 * H, "lease-expired", 24.0)
    else:  # until the idle tail ends
        assert (second.end, second.reason, second.cost_usd) == (3.25 * H, "explicit", 10.0)


# ---- slurm-cheapest ---------------------------------------------------------------------


def test_slurm_cheapest_starts_on_the_type_cheapest_per_unit_of_work() -> None:
    jobs = [job(0, 0, 2, [(2, 80)], requested=3, named=None)]  # 2 h on SLOW, 1 h on FAST
    cheap = run(run_slurm_cheapest, jobs, on_sale())[0]
    assert (cheap.gpu_type, cheap.start, cheap.end, cheap.cost_usd) == ("FAST", 0, H, 1.5 * 2)
    plain = run(run_slurm_like, jobs, on_sale())[0]  # the pool's first type
    assert (plain.gpu_type, plain.start, plain.end, plain.cost_usd) == ("SLOW", 0, 2 * H, 4.0)


def test_slurm_cheapest_falls_back_when_the_cheapest_is_full_and_keeps_named_types() -> None:
    jobs = [
        job(0, 0, 4, [(1, 80)], requested=1),  # fills FAST until 1 h
        job(1, 10, 2, [(2, 80)], requested=3, named=None),  # FAST full: SLOW, 2 h
        job(2, H + 10, 1, [(1, 80)], requested=2, named="SLOW"),  # FAST free, SLOW named
        job(3, H + 20, 1, [(1, 80)], requested=2, named=None),  # FAST free again: 30 min
    ]
    out = run(run_slurm_cheapest, jobs, on_sale())
    assert {a.job: (a.gpu_type, a.start, a.end) for a in out} == {
        0: ("FAST", 0, H),
        1: ("SLOW", 10, 10 + 2 * H),
        2: ("SLOW", H + 10, 2 * H + 10),
        3: ("FAST", H + 20, 1.5 * H + 20),
    }


def test_slurm_cheapest_breaks_reservation_ties_cheapest_first() -> None:
    jobs = [
        job(0, 0, 6, [(1, 80)], requested=1, named="SLOW"),  # 2 SLOW left until 1 h
        job(1, 0, 2, [(1, 80)], requested=1),  # 2 FAST left until 1 h
        job(2, 10, 4, [(1, 80)], requested=1, named=None),  # the head: 4 of either at 1 h
        job(3, 20, 2, [(1, 80)], requested=3),  # 2 FAST free now, walltime past 1 h
    ]
    # slurm-like reserves SLOW (pool order): 3 uses another type and starts at once
    assert spans(run(run_slurm_like, jobs, on_sale())) == {
        0: (0, H),
        1: (0, H),
        2: (H, 2 * H),
        3: (20, 20 + H),
    }
    # slurm-cheapest reserves FAST with none spare: 3 would delay the head, so it waits
    assert spans(run(run_slurm_cheapest, jobs, on_sale())) == {
        0: (0, H),
        1: (0, H),
        2: (H, 1.5 * H),
        3: (1.5 * H, 2.5 * H),
    }


# ---- cheapest-first ---------------------------------------------------------------------


def test_cheapest_first_takes_the_cheapest_type_free_now() -> None:
    jobs = [
        job(0, 0, 2, [(2, 80)], requested=3, named=None),  # FAST: 1 h
        job(1, 10, 4, [(2, 80)], requested=3, named=None),
    ]  # 2 FAST free: SLOW, 2 h
    out = run(run_cheapest_first, jobs, on_sale())
    assert {a.job: (a.gpu_type, a.start, a.end, a.cost_usd) for a in out} == {
        0: ("FAST", 0, H, 3.0),
        1: ("SLOW", 10, 10 + 2 * H, 8.0),
    }
    # at list price FAST costs $2 per unit of work against SLOW's $1
    assert run(run_cheapest_first, jobs[:1])[0].gpu_type == "SLOW"


def test_cheapest_first_head_blocks_its_partition_only() -> None:
    jobs = [
        job(0, 0, 8, [(1, 80)], requested=1, named=None),  # all of SLOW until 1 h
        job(1, 10, 6, [(1, 80)], requested=1, named=None),  # SLOW only (4 FAST): waits
        job(2, 20, 1, [(1, 80)], requested=1, named=None),  # fits FAST now, behind 1
        job(3, 30, 1, [(1, 80)], requested=1, named="EDGE"),  # another partition
    ]
    out = run(run_cheapest_first, jobs, tiny(EDGE))
    assert {a.job: (a.gpu_type, a.start, a.end) for a in out} == {
        0: ("SLOW", 0, H),
        1: ("SLOW", H, 2 * H),
        2: ("SLOW", H, 2 * H),
        3: ("EDGE", 30, 30 + H),
    }
    # slurm-like backfills 2 onto FAST at once
    assert spans(run(run_slurm_like, jobs, tiny(EDGE)))[2] == (20, 20 + 0.5 * H)


def test_cheapest_first_has_no_lease() -> None:
    # work 1 h, pause 30 min, work 1 h, idle 15 min, on a 2 h lease: runs to its end
    j = job(0, 0, 2, [(1, 80), (0.5, 0), (1, 80), (0.25, 0)], requested=2)
    (only,) = run(run_cheapest_first, [j])
    assert (only.outcome, only.reason, only.start, only.end, only.done_at, only.cost_usd) == (
        "completed",
        "explicit",
        0,
        2.75 * H,
        2.5 * H,
        4.0 * 2 * 2.75,
    )
    first = run(run_slurm_like, [j])[0]  # killed by its walltime
    assert (first.outcome, first.reason, first.end) == ("killed", "lease-expired", 2 * H)
    # nor the longest lease allowed
    config = tiny("\n[limits]\nmax_duration_hours = 1\n")
    long = job(0, 0, 1, [(2, 80)], requested=1, named=None, purpose=Purpose.RESEARCH)
    assert [(a.outcome, a.end) for a in run(run_cheapest_first, [long], config)] == [
        ("completed", 2 * H)
    ]


def test_cheapest_autostop_stops_a_launched_jobs_gpus_after_its_command() -> None:
    """SkyPilot's autostop waiting for jobs alone: a launched job's GPUs go 5 minutes after
    its last work phase (its command exited), not after its 2-hour idle tail; a job whose work
    is no launched command (a notebook) keeps its tail, as cheapest-first does."""
    j = job(0, 0, 2, [(1, 80), (0.5, 0), (1, 80), (2, 0)], requested=8)
    launched = replace(j, supervised=True)
    (stopped,) = run(run_cheapest_autostop, [launched])
    assert (stopped.outcome, stopped.end, stopped.done_at) == ("completed", 2.5 * H + 300, 2.5 * H)
    assert stopped.cost_usd == pytest.approx(4.0 * 2 * (2.5 + 300 / H))
    (kept,) = run(run_cheapest_autostop, [j])
    assert kept.end == 4.5 * H == run(run_cheapest_first, [launched])[0].end


def test_slurm_batch_ends_a_launched_job_with_its_script() -> None:
    """A batch job ends when its script exits: a launched job's GPUs go at its last work
    phase's end, not after its 2-hour idle tail; a job run in a shell keeps its tail, as under
    slurm-cheapest; a launched job whose work passes its walltime is still killed there."""
    j = job(0, 0, 2, [(1, 80), (0.5, 0), (1, 80), (2, 0)], requested=8)
    launched = replace(j, supervised=True)
    (ended,) = run(run_slurm_batch, [launched])
    assert (ended.outcome, ended.reason, ended.end) == ("completed", "explicit", 2.5 * H)
    assert ended.cost_usd == pytest.approx(4.0 * 2 * 2.5)
    (kept,) = run(run_slurm_batch, [j])
    assert kept.end == 4.5 * H == run(run_slurm_cheapest, [launched])[0].end
    short = replace(launched, requested_hours=2.0)
    first = run(run_slurm_batch, [short])[0]
    assert (first.outcome, first.reason, first.end) == ("killed", "lease-expired", 2 * H)


def test_research_starts_over_after_a_kill() -> None:
    j = job(
        0, 0, 1, [(1, 80), (0.5, 0), (1, 80)], requested=2, named=None, purpose=Purpose.RESEARCH
    )
    first, second = by_job(run(run_slurm_like, [j]))[0]
    assert (first.outcome, first.end) == ("killed", 2 * H)
    # all 2.5 h again, padded 2 x: 5 h, asked as 6 h; ends with its timeline
    assert (second.start, second.end, second.outcome, second.cost_usd) == (
        2 * H,
        4.5 * H,
        "completed",
        2.5,
    )


@policies(*LEASED)
def test_a_job_that_never_fits_its_lease_gives_up_after_max_attempts(policy: Policy) -> None:
    config = tiny("\n[limits]\nmax_duration_hours = 1\n")
    j = job(0, 0, 1, [(2, 80)], requested=1, named=None, purpose=Purpose.RESEARCH)
    done: list[int] = []
    out = policy(Workload([j]), config, done.append)
    assert [(a.attempt, a.start, a.end, a.outcome) for a in out] == [
        (n, (n - 1) * H, n * H, "killed") for n in range(1, MAX_ATTEMPTS + 1)
    ]
    assert done == [1]


@policies()
def test_a_job_larger_than_the_fleet_is_refused(policy: Policy) -> None:
    jobs = [
        job(0, 0, 16, [(1, 80)], requested=1, named=None),  # 8 SLOW, 4 FAST
        job(1, 5, 6, [(1, 80)], requested=1),
    ]  # names FAST: 4 of them
    out = run(policy, jobs)
    assert [(a.job, a.outcome, a.reason, a.start, a.gpu_type, a.cost_usd) for a in out] == [
        (0, "unplaced", "more GPUs than the fleet has", None, None, 0.0),
        (1, "unplaced", "more GPUs than the fleet has", None, None, 0.0),
    ]


# ---- both -------------------------------------------------------------------------------


def random_jobs(n: int, seed: int) -> list[SimJob]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        named = rng.choice(["FAST", "SLOW", None])
        phases = [(rng.uniform(0.1, 3), 80), (rng.uniform(0, 1), 0), (rng.uniform(0.1, 2), 50)]
        out.append(
            job(
                i,
                float(rng.randrange(0, 40) * 600),
                rng.choice([1, 1, 2, 4, 8]),
                phases,
                requested=rng.choice([1, 2, 4, 8]),
                named=named,
                project=rng.choice("abc"),
                purpose=rng.choice(list(Purpose)),
            )
        )
    return out


@policies()
def test_same_jobs_same_attempts(policy: Policy) -> None:
    jobs = random_jobs(300, seed=7)
    first = run(policy, jobs)
    assert run(policy, jobs) == first
    assert run(policy, list(reversed(jobs))) == first
    check_invariants(first, jobs, tiny())
    if policy is run_cheapest_first:  # no lease: nothing is killed
        assert {a.outcome for a in first} == {"completed", "unplaced"}


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
        # asked again at the kill, or when the pause it was killed in was over
        assert all(a.end is not None and b.submit >= a.end for a, b in itertools.pairwise(attempts))
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
@policies()
def test_the_start_of_the_real_trace_keeps_the_invariants(policy: Policy) -> None:
    config = load_fleet(Path(__file__).resolve().parents[1] / "fleet" / "data" / "trace_fleet.toml")
    workload = synthesize(read_trace(TRACE, limit=2000), config)
    done: list[int] = []
    out = policy(workload, config, done.append)
    check_invariants(out, workload.jobs, config)
    assert sum(done) == len(workload.jobs)
    assert sum(a.outcome == "completed" for a in out) > 0.9 * len(workload.jobs)
    if policy is run_naive:  # strict FCFS per type: an earlier request never starts later
        for gpu_type in config.catalog:
            mine = sorted(
                (a.submit, a.start) for a in out if a.gpu_type == gpu_type and a.start is not None
            )
            starts = [s for _, s in mine]
            assert starts == sorted(starts)
        assert {a.reason for a in out if a.start is not None} == {"lease-expired"}


@pytest.mark.skipif(not TRACE.exists(), reason="the Philly trace is not in ../shared/traces")
def test_the_new_baselines_complete_a_slice_of_the_real_trace() -> None:
    config = load_fleet(Path(__file__).resolve().parents[1] / "fleet" / "data" / "trace_fleet.toml")
    workload = synthesize(read_trace(TRACE, limit=500), config)
    cost: dict[str, float] = {}
    for name in ("slurm-like", "slurm-cheapest", "cheapest-first"):
        out = POLICIES[name](workload, config, None)
        check_invariants(out, workload.jobs, config)
        final = {a.job: a.outcome for a in out}  # the last attempt of each job
        if name != "slurm-like":
            assert set(final.values()) == {"completed"}
        cost[name] = sum(a.cost_usd for a in out)
        if name == "cheapest-first":  # strict FCFS per partition, nothing killed
            assert {a.reason for a in out} == {"explicit"}
            partition = _partitions(config)
            for p in set(partition.values()):
                mine = sorted(
                    (a.submit, a.job, a.start)
                    for a in out
                    if a.gpu_type is not None and a.start is not None and partition[a.gpu_type] == p
                )
                starts = [s for *_, s in mine]
                assert starts == sorted(starts)
    assert cost["slurm-cheapest"] <= cost["slurm-like"]

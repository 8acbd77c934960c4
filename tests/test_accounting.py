"""sim.accounting on test_sim_metrics' hand-built run (its docstring works out each figure),
and the floor and work units on a fleet with a faster and a cheaper type."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fleet.config import FleetConfig, GPUTypeSpec, NodeSpec
from fleet.models import Purpose
from sim.accounting import (
    breakdown,
    floor,
    floor_usd,
    parts,
    pause_hours,
    same_work,
    savings,
    unit_type,
    work_units,
)
from sim.lifecycle import Attempt, account, rerun, timeline, with_kept
from sim.report import strongest, table, write_report
from sim.workload import Phase, SimJob
from tests.test_sim_metrics import ATTEMPTS, CONFIG, J4, JOBS, _results, job, refused, t

AGENT = [a for a in ATTEMPTS if a.job != 4] + [refused(J4, "denied", "budget")]
MIXED = FleetConfig(
    catalog={
        "A100": GPUTypeSpec(memory_gb=80, price_per_hour=5.0, relative_throughput=1.0),
        "H100": GPUTypeSpec(memory_gb=80, price_per_hour=8.0, relative_throughput=2.0),
        "T4": GPUTypeSpec(memory_gb=16, price_per_hour=0.5, relative_throughput=0.15),
    },
    pools={
        Purpose.TRAINING: ["A100", "H100"],
        Purpose.INFERENCE: ["T4"],
        Purpose.RESEARCH: ["A100"],
    },
    nodes=[
        NodeSpec(name="a", gpu_type="A100", gpus=8),
        NodeSpec(name="h", gpu_type="H100", gpus=2),
        NodeSpec(name="t", gpu_type="T4", gpus=4),
    ],
)


def sim_job(
    count: int, *phases: Phase, named: str | None = None, purpose: Purpose = Purpose.TRAINING
) -> SimJob:
    return SimJob(
        id=0,
        project="p",
        submit=t(0),
        count=count,
        purpose=purpose,
        named_type=named,
        reference=named or "A100",
        requested_hours=8.0,
        pad=2.0,
        phases=phases,
    )


def test_work_is_counted_in_hours_of_the_unit_type() -> None:
    assert unit_type(MIXED) == "A100"
    assert work_units(sim_job(2, Phase(3, 80)), MIXED) == 6.0
    # 3 h of work on an H100 is 6 A100-hours of work; idle phases are not work
    assert work_units(sim_job(1, Phase(3, 80), Phase(1, 0), named="H100"), MIXED) == 6.0


def test_the_floor_takes_the_cheapest_type_per_job_with_its_pauses_not_its_tail() -> None:
    job = sim_job(1, Phase(2, 90), Phase(1, 0), Phase(2, 90), Phase(5, 0))
    assert pause_hours(job) == 1.0
    # A100: (4 + 1) x $5 = $25; H100: (2 + 1) x $8 = $24
    assert floor_usd(job, MIXED) == 24.0
    # 4 GPUs: the fleet has 2 H100, so only the A100s can do it
    assert floor_usd(sim_job(4, Phase(2, 90)), MIXED) == 40.0
    # a named type is the only type; a job with no work costs nothing
    assert floor_usd(sim_job(1, Phase(2, 90), named="H100"), MIXED) == 16.0
    assert floor_usd(sim_job(1, Phase(2, 0)), MIXED) == 0.0
    bound = floor([sim_job(1, Phase(2, 90)), sim_job(4, Phase(2, 90))], MIXED)
    assert (bound.unit, bound.usd, bound.work_units) == ("A100", 8.0 + 40.0, 2.0 + 8.0)


def test_the_hand_run_against_its_floor() -> None:
    assert floor(JOBS, CONFIG).usd == 68.0
    parts = breakdown(ATTEMPTS, CONFIG)
    assert parts == {"work": 12.0, "pause": 3.0, "tail": 8.0, "killed": 8.0}
    assert sum(parts.values()) == pytest.approx(sum(a.cost_usd for a in ATTEMPTS))


def test_savings_add_up_and_work_not_done_is_named() -> None:
    # gpu-agent's run denies job 4 (two killed tries in the naive run): $6 saved by kills
    s = savings(ATTEMPTS, AGENT, CONFIG)
    assert s == {
        "tail": 0.0,
        "pause": 0.0,
        "killed": 6.0,
        "routing": 0.0,
        "work_not_done": 0.0,
        "total": 6.0,
    }
    # a run that did not do job 0: the $4 it saved is work not done
    fewer = [a for a in ATTEMPTS if a.job != 0] + [refused(JOBS[0], "denied", "council")]
    s = savings(ATTEMPTS, fewer, CONFIG)
    assert s["work_not_done"] == 4.0 and s["routing"] == 0.0 and s["total"] == 4.0


def test_work_a_killed_attempt_kept_is_work_not_a_routing_saving() -> None:
    """A training job (2 GPUs, two 1-hour work phases with a pause between) killed in its
    pause, after its first phase's checkpoint, and run again from it: the $4 its first hour
    of work cost is work (kept), the pause $4, nothing is lost. Against a run that did the
    job in one go on the same type (its pause held too), nothing is saved: not by routing,
    not by kills. Before, the kept $4 counted as killed, and as $4 of routing saved."""
    j = job(0, "a", 2, Purpose.TRAINING, 0, Phase(1.0, 80.0), Phase(1.0, 0.0), Phase(1.0, 80.0))

    def run(job_: SimJob, start: float, end: float, attempt: int) -> Attempt:
        segments = timeline(job_, "A100", t(start), CONFIG)
        cost = 2.0 * job_.count * (end - start)  # $2 an A100-hour
        return account(job_, attempt, "A100", t(start), segments, t(end), "idle", cost)

    killed = run(j, 0, 2, 1)  # its first phase done and checkpointed, killed in its pause
    again = rerun(j, timeline(j, "A100", t(0), CONFIG), t(2), "idle", 1, CONFIG)
    assert again is not None and [p.hours for p in again.phases] == [1.0]
    killed = with_kept(killed, j, again)
    assert killed.outcome == "killed" and killed.kept_gpu_hours == 2.0
    assert parts(killed, CONFIG) == {"work": 4.0, "pause": 4.0, "tail": 0.0, "killed": 0.0}
    done = run(again, 2, 3, 2)
    straight = run(j, 0, 3, 1)  # the pause held, the work done in one allocation
    s = savings([straight], [killed, done], CONFIG)
    assert s["routing"] == 0.0 and s["killed"] == 0.0 and s["total"] == s["pause"] == 0.0
    # without a checkpoint (an inference job starts over) all of its work is lost
    k = replace(j, purpose=Purpose.INFERENCE)
    lost = with_kept(
        run(k, 0, 2, 1), k, rerun(k, timeline(k, "A100", t(0), CONFIG), t(2), "idle", 1, CONFIG)
    )
    assert lost.kept_gpu_hours == 0.0 and parts(lost, CONFIG)["killed"] == 4.0


def test_same_work_is_the_jobs_every_policy_completed() -> None:
    fewer = [a for a in ATTEMPTS if a.job != 0] + [refused(JOBS[0], "denied", "council")]
    same = same_work(JOBS, {"naive": ATTEMPTS, "gpu-agent": fewer}, CONFIG)
    # jobs 1 and 2: floor 4 + 6; naive charged 12 + 3 + 6 for them
    assert same == {
        "jobs": 2,
        "floor_usd": 10.0,
        "policies": {
            "naive": {"cost_usd": 21.0, "cost_vs_floor": 2.1},
            "gpu-agent": {"cost_usd": 21.0, "cost_vs_floor": 2.1},
        },
    }


def test_the_strongest_baseline_does_the_most_work_then_costs_least() -> None:
    full = {"work_share": 1.0, "cost_vs_floor": 1.3}
    results = {
        "naive": {"work_share": 1.0, "cost_vs_floor": 4.0},
        "slurm-like": full,
        "cheap-but-lazy": {"work_share": 0.5, "cost_vs_floor": 0.6},
        "gpu-agent": {"work_share": 1.0, "cost_vs_floor": 1.0},
    }
    assert strongest(results) == "slurm-like"
    assert strongest({"gpu-agent": full}) is None


def test_a_cost_against_the_floor_of_zero_is_the_cheapest_not_unknown() -> None:
    results: dict[str, dict[str, float | None]] = {
        "naive": {"work_share": 0.0, "cost_vs_floor": 0.5},
        "slurm-like": {"work_share": 0.0, "cost_vs_floor": 0.0},
        "unknown": {"work_share": 0.0, "cost_vs_floor": None},
    }
    assert strongest(results) == "slurm-like"


def test_the_report_says_what_the_policies_say_together(tmp_path: Path) -> None:
    from sim.simulate import across

    results = _results()
    together = across(JOBS, {"naive": ATTEMPTS, "gpu-agent": AGENT}, results, CONFIG)
    assert together["floor"] == {"unit": "A100", "usd": 68.0, "work_units": 33.0}
    assert together["strongest_baseline"] == "naive"
    assert together["savings_usd"]["gpu-agent"]["naive"]["killed"] == 6.0
    text = table(results, together)
    assert "floor: $68.00 for 33.0 A100-hours of work" in text
    assert (
        "gpu-agent saves $6 against naive: routing $0, idle tails $0, pauses $0, kills "
        "$6, work not done $0" in text
    )
    meta = {"trace": "hand-built", "jobs": len(JOBS), "fleet": "4 x A100", "seed": 0}
    written = write_report(tmp_path, results, {"jobs": 6.0}, meta, together)
    doc = json.loads(written[0].read_text())
    assert doc["floor"]["usd"] == 68.0 and doc["same_work"]["jobs"] == 3
    assert doc["policies"]["gpu-agent"]["cost_vs_floor"] == round(25 / 68, 6)
    assert "work not done" in written[1].read_text()

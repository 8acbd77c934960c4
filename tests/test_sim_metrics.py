"""sim.metrics and sim.report on a hand-built run whose every figure is worked out below.

Fleet: 4 A100 at $2/h. Times in hours after T0. Projects a (budget $10), b ($20), c ($5).

job 0 (a) 1 GPU, 2 h at 80 %, submit 0: runs 0-2, completed at 2            cost  4
job 1 (a) 2 GPUs, 1 h at 50 % + 1 h idle tail, submit 0: held 0-3, work done
          at 1, then hoards 2 h x 2 GPUs (tail, then a lease with nothing left)   cost 12
job 2 (b) 1 GPU, research, 1 h work / 1 h pause / 1 h work, submit 1:
          try 1 runs 2-3.5, killed for idling in the pause (1 h of work lost)  cost  3
          try 2 starts over 4-7, completed at 7                                cost  6
job 3 (c) 4 GPUs, submit 0.5: denied (budget)
job 4 (c) 1 GPU, 3 h at 30 %, submit 0.5: killed by its lease twice, gives up
          (0.5-1.5, then 2-4)                                                  cost 2 + 4
job 5 (b) 8 GPUs, submit 5: never placed

Totals: cost 31, held 15.5 GPU-h, utilised 6.5, useful 2 + 2 + 2 = 6, span 7 h (28 fleet
GPU-h). JCTs 2, 1, 6; queueing 0, 0, 1 (job 2 first started at 2), 0 (job 4).
Finish ratios, refused and failed jobs at 0: job 0 2/2, job 1 1/1, job 2 3/6, job 5 0, jobs 3
and 4 0 -> a 1, b 0.25, c 0 -> Jain 1.5625 / (3 x 1.0625).
Slowdowns (JCT over the job alone on its fastest type, pauses in): job 0 2/2, job 1 1/1, job 2
6/3 (2 h of work and its 1 h pause) -> mean 4/3; per project a 1, b 2, c none completed.
Work (A100-hours): 2, 2, 2, 16, 3, 8 = 33, of which 6 completed; per project a 4/4, b 2/10,
c 0/19. Floor at $2/h, pauses in, tails out: 4 + 4 + 6 + 32 + 6 + 16 (job 5 needs more GPUs
than the fleet has: priced on its type anyway) = 68.
Cost by part: tail 8 (job 1's 4 GPU-h), pause 3 (job 2: 0.5 + 1 GPU-h), killed 2 + 6 (job 2's
first try less its pause, job 4), work 4 + 4 + 4 = 12.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.config import FleetConfig, GPUTypeSpec, NodeSpec
from fleet.models import Purpose
from sim.lifecycle import Attempt, account, rerun, timeline
from sim.metrics import (
    isolated_hours,
    jain,
    metrics,
    percentiles,
    series,
    summary,
    worst_project,
)
from sim.report import table, write_report
from sim.workload import Phase, SimJob

H = 3600.0
T0 = 1_500_000_000.0
CONFIG = FleetConfig(
    catalog={"A100": GPUTypeSpec(memory_gb=80, price_per_hour=2.0, relative_throughput=1.0)},
    pools={p: ["A100"] for p in Purpose},
    nodes=[NodeSpec(name="n0", gpu_type="A100", gpus=4)],
)
BUDGETS = {"a": 10.0, "b": 20.0, "c": 5.0}


def t(hours: float) -> float:
    return T0 + hours * H


def job(
    i: int, project: str, count: int, purpose: Purpose, submit: float, *phases: Phase
) -> SimJob:
    return SimJob(
        id=i,
        project=project,
        submit=t(submit),
        count=count,
        purpose=purpose,
        named_type=None,
        reference="A100",
        requested_hours=8.0,
        pad=2.0,
        phases=tuple(phases),
    )


JOBS = [
    job(0, "a", 1, Purpose.TRAINING, 0, Phase(2, 80)),
    job(1, "a", 2, Purpose.RESEARCH, 0, Phase(1, 50), Phase(1, 0)),
    job(2, "b", 1, Purpose.RESEARCH, 1, Phase(1, 100), Phase(1, 0), Phase(1, 100)),
    job(3, "c", 4, Purpose.TRAINING, 0.5, Phase(4, 90)),
    job(4, "c", 1, Purpose.INFERENCE, 0.5, Phase(3, 30)),
    job(5, "b", 8, Purpose.TRAINING, 5, Phase(1, 90)),
]


def ran(
    j: SimJob,
    n: int,
    submit: float,
    start: float,
    end: float,
    outcome: str,
    reason: str,
    **figures: float,
) -> Attempt:
    done = figures.pop("done_at", None)
    return Attempt(
        job=j.id,
        attempt=n,
        project=j.project,
        purpose=j.purpose,
        gpu_type="A100",
        count=j.count,
        submit=t(submit),
        start=t(start),
        end=t(end),
        outcome=outcome,
        reason=reason,
        done_at=None if done is None else t(done),
        **figures,
    )


def refused(j: SimJob, outcome: str, reason: str) -> Attempt:
    return Attempt(
        job=j.id,
        attempt=1,
        project=j.project,
        purpose=j.purpose,
        gpu_type=None,
        count=j.count,
        submit=j.submit,
        start=None,
        end=None,
        outcome=outcome,
        reason=reason,
    )


J0, J1, J2, J3, J4, J5 = JOBS
ATTEMPTS = [
    ran(
        J0,
        1,
        0,
        0,
        2,
        "completed",
        "done",
        cost_usd=4.0,
        held_gpu_hours=2.0,
        util_gpu_hours=1.6,
        work_gpu_hours=2.0,
        done_at=2,
    ),
    ran(
        J1,
        1,
        0,
        0,
        3,
        "completed",
        "lease_expired",
        cost_usd=12.0,
        held_gpu_hours=6.0,
        util_gpu_hours=1.0,
        hoarded_gpu_hours=4.0,
        work_gpu_hours=2.0,
        done_at=1,
    ),
    ran(
        J2,
        1,
        1,
        2,
        3.5,
        "killed",
        "idle",
        cost_usd=3.0,
        held_gpu_hours=1.5,
        util_gpu_hours=1.0,
        paused_gpu_hours=0.5,
        work_gpu_hours=1.0,
    ),
    ran(
        J2,
        2,
        3.5,
        4,
        7,
        "completed",
        "done",
        cost_usd=6.0,
        held_gpu_hours=3.0,
        util_gpu_hours=2.0,
        paused_gpu_hours=1.0,
        work_gpu_hours=2.0,
        done_at=7,
    ),
    refused(J3, "denied", "budget"),
    ran(
        J4,
        1,
        0.5,
        0.5,
        1.5,
        "killed",
        "lease_expired",
        cost_usd=2.0,
        held_gpu_hours=1.0,
        util_gpu_hours=0.3,
        work_gpu_hours=1.0,
    ),
    ran(
        J4,
        2,
        1.5,
        2,
        4,
        "killed",
        "lease_expired",
        cost_usd=4.0,
        held_gpu_hours=2.0,
        util_gpu_hours=0.6,
        work_gpu_hours=2.0,
    ),
    refused(J5, "unplaced", "no capacity"),
]


@pytest.fixture(scope="module")
def m() -> dict[str, Any]:
    return metrics(JOBS, ATTEMPTS, CONFIG, BUDGETS)


def test_hand_attempts_match_the_lifecycle_accounting() -> None:
    """The hand-written figures are what sim.lifecycle would have charged."""

    def acc(j: SimJob, n: int, start: float, end: float) -> Attempt:
        return account(
            j, n, "A100", t(start), timeline(j, "A100", t(start), CONFIG), t(end), "x", 0.0
        )

    for got, want in (
        (acc(J1, 1, 0, 3), ATTEMPTS[1]),
        (acc(J2, 1, 2, 3.5), ATTEMPTS[2]),
        (acc(J2, 2, 4, 7), ATTEMPTS[3]),
    ):
        for f in (
            "outcome",
            "held_gpu_hours",
            "util_gpu_hours",
            "paused_gpu_hours",
            "hoarded_gpu_hours",
            "work_gpu_hours",
            "done_at",
        ):
            assert getattr(got, f) == pytest.approx(getattr(want, f)), f


def test_jain() -> None:
    assert jain([1.0, 0.5]) == pytest.approx(0.9)
    assert jain([0.3, 0.3, 0.3]) == pytest.approx(1.0)
    assert jain([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        jain([])


def test_percentiles_and_summary() -> None:
    assert percentiles([6.0, 1.0, 2.0], [50, 99]) == pytest.approx([2.0, 5.92])
    assert percentiles([0.0, 0.0, 1.0, 0.0], [0, 100]) == [0.0, 1.0]
    assert summary([]) == {"mean": None, "p50": None, "p99": None}
    assert summary([1.0, 2.0, 6.0]) == {"mean": 3.0, "p50": 2.0, "p99": 5.92}


def test_isolated_hours_stop_at_the_last_work_phase() -> None:
    assert isolated_hours(J1) == 1.0
    assert isolated_hours(J2) == 3.0
    assert isolated_hours(job(9, "a", 1, Purpose.RESEARCH, 0, Phase(2, 0))) == 0.0


def test_cost_and_utilisation(m: dict[str, Any]) -> None:
    assert m["fleet_gpus"] == 4
    assert m["span_hours"] == 7.0
    assert m["total_cost_usd"] == 31.0
    assert m["gpu_hours_held"] == 15.5
    assert m["useful_gpu_hours"] == 6.0
    assert m["cost_per_useful_gpu_hour"] == round(31 / 6, 4)
    assert m["allocation_util"] == round(15.5 / 28, 6)
    assert m["sm_util"] == round(6.5 / 15.5, 6)
    assert m["sm_util_fleet"] == round(6.5 / 28, 6)
    assert m["hoarded_gpu_hours"] == 4.0
    assert m["paused_gpu_hours"] == 1.5


def test_completion_queueing_and_fairness(m: dict[str, Any]) -> None:
    assert m["jct_hours"] == {"mean": 3.0, "p50": 2.0, "p99": 5.92}
    assert m["queue_hours"] == {"mean": 0.25, "p50": 0.0, "p99": 0.97}
    assert m["jain_fairness"] == round(1.5625 / (3 * 1.0625), 6)
    assert m["per_project"]["a"]["finish_ratio"] == 1.0
    assert m["per_project"]["b"]["finish_ratio"] == 0.25  # job 5 never placed counts 0
    assert m["per_project"]["c"]["finish_ratio"] == 0.0  # refused and failed: not left out
    assert m["jain_work_share"] == round(1.44 / (3 * 1.04), 6)


def test_slowdown_against_the_job_alone(m: dict[str, Any]) -> None:
    assert m["slowdown_mean"] == round(4 / 3, 4)
    assert [m["per_project"][p]["slowdown_mean"] for p in "abc"] == [1.0, 2.0, None]


def test_the_worst_project_against_a_baseline(m: dict[str, Any]) -> None:
    """Project b's jobs take 1.5 times as long (slowdown 3 against 2), a's are unchanged."""
    other = json.loads(json.dumps(m))
    other["per_project"]["b"]["slowdown_mean"] = 3.0
    assert worst_project(other, m) == {"project": "b", "ratio": 1.5}
    assert worst_project(m, other) == {"project": "a", "ratio": 1.0}
    assert worst_project({"per_project": {}}, m) is None


def test_work_in_units_against_the_floor(m: dict[str, Any]) -> None:
    assert m["work_units_completed"] == 6.0
    assert m["work_share"] == round(6 / 33, 6)
    assert m["cost_per_work_unit"] == round(31 / 6, 4)
    assert m["cost_vs_floor"] == round(31 / 68, 6)
    assert m["cost_breakdown_usd"] == {"work": 12.0, "pause": 3.0, "tail": 8.0, "killed": 8.0}
    assert [m["per_project"][p]["work_share"] for p in "abc"] == [1.0, 0.2, 0.0]


def test_budgets_jobs_and_work(m: dict[str, Any]) -> None:
    assert m["budget_violations"] == {"count": 2, "usd": 7.0}  # a 16 > 10, c 6 > 5
    assert m["jobs"] == {"total": 6, "completed": 3, "failed": 1, "denied": 1, "unplaced": 1}
    assert m["work"] == {
        "completed_gpu_hours": 6.0,
        "failed_gpu_hours": 16.0 + 3.0 + 8.0,
        "run_gpu_hours": 10.0,
        "lost_gpu_hours": 4.0,
        "lost_work_units": 4.0,  # A100 alone: the unit type's hours
        "redone_gpu_hours": 1.0,  # job 2's first hour, run again
        "abandoned_gpu_hours": 3.0,  # job 4's two tries
        "killed_attempts": 3,
        "preempted_attempts": 0,
        "kill_reasons": {"idle": 1, "lease_expired": 2},
        "wasted_cost_usd": 8.0,  # the killed part (job 2's held pause is a pause: $1)
    }


def test_per_project(m: dict[str, Any]) -> None:
    assert m["per_project"]["a"] == {
        "cost_usd": 16.0,
        "budget_usd": 10.0,
        "gpu_hours_held": 8.0,
        "useful_gpu_hours": 4.0,
        "share_of_gpu_hours": round(8 / 15.5, 6),
        "jobs": 2,
        "jobs_completed": 2,
        "finish_ratio": 1.0,
        "work_share": 1.0,
        "slowdown_mean": 1.0,
    }
    assert [m["per_project"][p]["cost_usd"] for p in "abc"] == [16.0, 9.0, 6.0]
    assert sum(v["share_of_gpu_hours"] for v in m["per_project"].values()) == pytest.approx(
        1.0, abs=1e-5
    )


def test_series_on_an_hourly_grid() -> None:
    s = series(ATTEMPTS, t(0), t(7), [2.0, 1.0, 6.0], points=8)
    assert s["t_hours"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert s["gpus_held"] == [3.0, 4.0, 4.0, 2.0, 1.0, 1.0, 1.0, 0.0]
    # at 1 h: half of job 0's $4, a third of job 1's $12, half of job 4's first $2
    assert s["cost_usd"][1] == 7.0
    assert s["cost_usd"][-1] == 31.0
    assert s["jct_cdf"]["hours"][0] == 1.0 and s["jct_cdf"]["hours"][-1] == 6.0


def test_series_in_metrics_is_fixed_size(m: dict[str, Any]) -> None:
    assert len(m["series"]["t_hours"]) == 200
    assert len(m["series"]["jct_cdf"]["hours"]) == 101
    assert m["series"]["cost_usd"][-1] == 31.0


def test_a_run_where_nothing_completes() -> None:
    out = metrics(JOBS[3:4], [ATTEMPTS[4]], CONFIG, BUDGETS)
    assert out["jct_hours"]["mean"] is None and out["queue_hours"]["p99"] is None
    assert out["jain_fairness"] is None and out["cost_per_useful_gpu_hour"] is None
    assert out["jobs"]["denied"] == 1 and out["series"]["jct_cdf"]["hours"] == []
    assert "n/a" in table({"naive": out})


def _results() -> dict[str, dict[str, Any]]:
    """naive: the run above; gpu-agent: the same, with job 4 denied instead of run twice."""
    agent = [a for a in ATTEMPTS if a.job != 4] + [refused(J4, "denied", "budget")]
    return {
        "naive": metrics(JOBS, ATTEMPTS, CONFIG, BUDGETS),
        "gpu-agent": metrics(JOBS, agent, CONFIG, BUDGETS),
    }


def test_table_has_a_column_per_policy_and_the_deltas() -> None:
    text = table(_results())
    header = text.splitlines()[0]
    assert header.index("naive") < header.index("gpu-agent")
    assert "31.00" in text and "25.00" in text
    assert (
        "gpu-agent versus naive: cost -19.4%, work done 18.18% against 18.18%, cost per "
        "unit of work -19.4%" in text
    )
    assert "3 / 0 / 2" in text  # gpu-agent: completed / failed / denied


def test_write_report_is_complete_and_reproducible(tmp_path: Path) -> None:
    meta = {"trace": "hand-built", "jobs": len(JOBS), "fleet": "4 x A100", "seed": 0}
    calibration = {
        "jobs": 6.0,
        "gpu_hours": 31.0,
        "mean_util_pct": 49.5,
        "idle_share": 0.3,
        "idle_share_under_6h": 0.3,
        "idle_share_over_24h": 0.0,
    }
    first = write_report(tmp_path / "one", _results(), calibration, meta)
    second = write_report(tmp_path / "two", _results(), calibration, meta)
    names = [
        "metrics.json",
        "report.md",
        "cost_over_time.png",
        "utilisation.png",
        "jct.png",
        "project_share.png",
    ]
    assert [p.name for p in first] == names
    assert all(p.exists() and p.stat().st_size > 0 for p in first + second)
    assert first[0].read_bytes() == second[0].read_bytes()
    doc = json.loads(first[0].read_text())
    assert set(doc) == {"meta", "calibration", "policies"}
    assert doc["policies"]["naive"]["total_cost_usd"] == 31.0
    report = first[1].read_text()
    for text in (
        "| naive | gpu-agent |",
        "![jct](jct.png)",
        "32 %",
        "47-52 %",
        "jain_fairness",
        "hand-built",
    ):
        assert text in report


def test_a_noticed_training_job_goes_on_from_where_its_lease_ended_it() -> None:
    """Work 2 h, a 1 h pause, work 2 h; ended 1 h into its first work phase. Given notice (a
    lease or budget end, under `gpu-agent run`), it checkpoints there: 1 h of that phase is
    left. Unsupervised, or ended for idling, it goes back to its last checkpoint, the start."""
    from dataclasses import replace

    from fleet.models import ReleaseReason

    phases = (Phase(2, 80), Phase(1, 0), Phase(2, 80))
    base = job(9, "a", 1, Purpose.TRAINING, 0, *phases)
    segments = timeline(base, "A100", t(0), CONFIG)
    noticed = rerun(
        replace(base, supervised=True), segments, t(1), ReleaseReason.LEASE_EXPIRED, 1, CONFIG
    )
    assert noticed is not None and noticed.phases == (Phase(1, 80), *phases[1:])
    for j, reason in (
        (base, ReleaseReason.LEASE_EXPIRED),
        (replace(base, supervised=True), ReleaseReason.IDLE),
    ):
        again = rerun(j, segments, t(1), reason, 1, CONFIG)
        assert again is not None and again.phases == phases
    after_pause = rerun(
        replace(base, supervised=True), segments, t(2.5), ReleaseReason.LEASE_EXPIRED, 1, CONFIG
    )
    assert after_pause is not None and after_pause.phases == phases[2:]

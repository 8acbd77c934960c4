"""The workload model's project habits (sim/workload.py): off by default, projects that differ
as widely as published per virtual cluster when on, and habits that change once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fleet.config import FleetConfig, parse_fleet
from fleet.trace import Job, read_trace
from sim.simulate import fleet_source
from sim.workload import (
    SimJob,
    WorkloadSettings,
    calibration,
    project_habits,
    project_spread,
    synthesize,
)
from tests.conftest import SHARED

PHILLY = SHARED / "traces" / "philly.csv"
T0 = 1_767_225_600.0


def config() -> FleetConfig:
    name, text = fleet_source(None)
    return parse_fleet(text, source=name)


def trace(projects: int = 6, jobs: int = 400) -> list[Job]:
    """Every project submits the same 4-hour jobs, an hour apart, so that only habits differ."""
    return [
        Job(f"p{p}", T0 + i * 3600.0, 2, 4.0, line=p * jobs + i + 1)
        for p in range(projects)
        for i in range(jobs)
    ]


def idle_share(jobs: list[SimJob]) -> float:
    return project_spread(jobs, least=0.0)["project_idle_share_median"]


def test_without_habits_every_project_is_alike_and_the_workload_is_as_before() -> None:
    """habit_sigma 0 (the default) draws no habits, whatever the other habit settings say:
    the figures quoted for the whole trace stay those of projects alike."""
    jobs = trace()
    plain = synthesize(jobs, config())
    assert project_habits(jobs, WorkloadSettings()) == {}
    other = WorkloadSettings(drift_share=1.0, unsupervised_projects=1.0)
    assert synthesize(jobs, config(), other) == plain
    spread = project_spread(plain.jobs)
    assert spread["project_idle_share_max"] - spread["project_idle_share_min"] < 0.1


def test_habits_spread_projects_far_apart_and_are_seeded() -> None:
    s = WorkloadSettings(habit_sigma=1.5, drift_share=0.0)
    jobs = trace(projects=12)
    got = synthesize(jobs, config(), s)
    assert synthesize(jobs, config(), s) == got  # seeded
    spread = project_spread(got.jobs)
    assert spread["project_idle_share_max"] - spread["project_idle_share_min"] > 0.5
    habits = project_habits(jobs, s)
    assert all(h.switch_at == math.inf for h in habits.values())
    # the shift ranks the projects' idle shares
    by_shift = sorted(habits, key=lambda p: habits[p].before.idle_shift)
    lowest, highest = (
        idle_share([j for j in got.jobs if j.project == p]) for p in (by_shift[0], by_shift[-1])
    )
    assert lowest < highest


def test_a_project_whose_habits_drift_changes_at_its_switch() -> None:
    """Every project drifts: a job's idle share follows the habit of the stretch it was
    submitted in; with unsupervised_projects 1, no project uses `gpu-agent run`."""
    s = WorkloadSettings(habit_sigma=3.0, drift_share=1.0, unsupervised_projects=1.0)
    jobs = trace(projects=4, jobs=600)
    got = synthesize(jobs, config(), s)
    assert not any(j.supervised for j in got.jobs)
    habits = project_habits(jobs, s)
    first, last = T0, T0 + 599 * 3600.0
    for project, h in habits.items():
        assert first <= h.switch_at <= last
        mine = [j for j in got.jobs if j.project == project]
        before = [j for j in mine if j.submit < h.switch_at]
        after = [j for j in mine if j.submit >= h.switch_at]
        if len(before) < 50 or len(after) < 50:
            continue
        gap = h.after.idle_shift - h.before.idle_shift
        if abs(gap) > 1.0:  # far enough apart to tell on 50 jobs
            assert (idle_share(after) > idle_share(before)) == (gap > 0), project


def test_on_philly_habits_span_the_published_range_and_keep_the_idle_share() -> None:
    """sd 1.5 on the whole trace: the 15 virtual clusters' idle shares from under 5 % to
    over 85 % (Helios, per virtual cluster: 0.8 % to 91 %), the trace's idle share within
    the band Philly's published figures give (25 % of held GPU time for long jobs to 49 %
    for short ones)."""
    jobs = read_trace(PHILLY)
    got = calibration(synthesize(jobs, config(), WorkloadSettings(habit_sigma=1.5)).jobs)
    assert got["project_idle_share_min"] < 0.05 and got["project_idle_share_max"] > 0.85
    assert 0.25 <= got["idle_share"] <= 0.49


@pytest.mark.parametrize("sigma", ["-1", "nan", "4.5"])
def test_simulate_refuses_habits_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sigma: str
) -> None:
    from graph.cli import main

    csv = tmp_path / "t.csv"
    csv.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-01 00:00:00,60,1,0,a\n")
    code = main(["simulate", "--trace", str(csv), "--out", str(tmp_path / "o"), "--habits", sigma])
    err = capsys.readouterr().err
    assert code == 2 and "--habits must be from 0 to 4" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()

"""`gpu-agent simulate --workload pure` and the slowdown: jobs that do nothing but work (no
idle, no pad, no budget) under every policy, a slowdown that is never under 1 and is 1 for a
job alone on its fastest type, a virtual cluster chosen by name, the same bytes twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.config import parse_fleet
from fleet.models import Purpose
from fleet.trace import PHILLY as SCHEMA
from fleet.trace import read_trace
from sim.accounting import fastest_hours, floor_usd
from sim.metrics import job_results, metrics, slowdown
from sim.simulate import POLICIES, select
from sim.workload import PURE_UTIL, Phase, Workload, WorkloadSettings, loan_types, synthesize
from tests.test_simulate import TINY_FLEET, _fleet, _trace, job, run

PURE = WorkloadSettings(pure=True)
POLICY_NAMES = ("slurm-like", "slurm-cheapest", "cheapest-first", "gpu-agent-no-council")


def test_pure_jobs_are_all_work_with_unpadded_leases(tmp_path: Path) -> None:
    """Same purposes as the normal workload, no named type (its work on its pool's reference
    type); one work phase of the trace's duration; the lease is that work on the slowest
    type the job may use (T4 for a job of the T4-only pool is the reference itself), never
    under a minute; no budgets."""
    config = parse_fleet(TINY_FLEET)
    trace = read_trace(_trace(tmp_path))
    normal = synthesize(trace, config)
    pure = synthesize(trace, config, PURE)
    assert pure.budgets == {} and normal.budgets
    for n, p, t in zip(normal.jobs, pure.jobs, trace, strict=True):
        assert p.purpose == n.purpose and p.named_type is None
        assert p.reference == config.pool(p.purpose)[0]
        assert [(ph.hours, ph.util, ph.stall) for ph in p.phases] == [(t.hours, PURE_UTIL, 0.0)]
        assert p.pad == 1.0 and p.supervised
        # the pools' first types are their slowest here: the lease is the work itself
        assert p.requested_hours == pytest.approx(max(t.hours, 1 / 60))


def test_a_pool_whose_first_type_is_not_its_slowest_gets_the_slowest_types_lease(
    tmp_path: Path,
) -> None:
    config = parse_fleet(
        TINY_FLEET.replace('training = ["A100", "H100"]', 'training = ["A100", "T4"]')
    )
    trained = [
        j
        for j in synthesize(read_trace(_trace(tmp_path)), config, PURE).jobs
        if j.named_type is None and j.reference == "A100"
    ]
    assert trained
    for j in trained:  # A100 work on a T4 at a quarter of the speed: four times as long
        assert j.requested_hours == pytest.approx(max(4 * j.work_hours, 1 / 60))


def test_pure_jobs_all_checkpoint_and_may_borrow_the_types_with_their_memory(
    tmp_path: Path,
) -> None:
    """Every pure job checkpoints (Philly's jobs all train), so that a fleet that lends may
    lend it the other pools' types with its pool reference's memory: inference (sized on a
    16 GB T4) the A100s and H100s, training (80 GB) no T4. Normal inference never borrows.
    The floor and the fastest time read the loans too: the H100 for that inference."""
    config = parse_fleet(TINY_FLEET)
    trace = read_trace(_trace(tmp_path))
    normal, pure = synthesize(trace, config), synthesize(trace, config, PURE)
    assert all(j.checkpoints for j in pure.jobs)
    assert {j.memory_gb for j in pure.jobs if j.purpose is Purpose.TRAINING} == {80.0}
    served = [j for j in pure.jobs if j.purpose is Purpose.INFERENCE]
    assert served and {loan_types(j, config) for j in served} == {("A100", "H100")}
    assert {loan_types(j, config) for j in pure.jobs if j.purpose is Purpose.TRAINING} == {()}
    assert not any(loan_types(j, config) for j in normal.jobs if j.purpose is Purpose.INFERENCE)
    for j in served[:3]:
        assert fastest_hours(j, config) == pytest.approx(j.work_hours * 0.25 / 2.0)
        assert floor_usd(j, config) == pytest.approx(0.5 * j.work_hours)  # the T4: cheapest


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_pure_jobs_never_idle_and_finish_all_their_work(tmp_path: Path, name: str) -> None:
    config = parse_fleet(_fleet(tmp_path).read_text())
    w = synthesize(read_trace(_trace(tmp_path)), config, PURE)
    attempts, _ = POLICIES[name](w, config, tmp_path / name, lambda _n: None)
    m = metrics(w.jobs, attempts, config, w.budgets)
    assert m["jobs"]["completed"] == len(w.jobs) and m["work_share"] == 1.0
    assert m["paused_gpu_hours"] == 0.0 and m["hoarded_gpu_hours"] == 0.0
    assert m["work"]["killed_attempts"] == 0 and m["work"]["lost_gpu_hours"] == 0.0
    assert m["sm_util"] == pytest.approx(1.0)
    results = job_results(w.jobs, attempts)
    slowdowns = [slowdown(r, config) for r in results]
    assert all(s is not None and s >= 1.0 for s in slowdowns)
    assert m["slowdown_mean"] == pytest.approx(
        sum(s or 0 for s in slowdowns) / len(slowdowns), abs=1e-4
    )
    assert m["per_project"]["vc-a1b2"]["slowdown_mean"] >= 1.0


def test_a_job_alone_on_its_fastest_type_has_slowdown_one_and_waiting_raises_it(
    tmp_path: Path,
) -> None:
    """Two 4-GPU training jobs of 2 A100-hours, submitted together on 4 A100s and 2 H100s:
    only the A100s can hold them, so each alone takes 2 h. The first runs at once (JCT 2 h,
    slowdown 1), the second waits for it (JCT 4 h, slowdown 2)."""
    config = parse_fleet(TINY_FLEET)
    w = Workload([job(i, "p", 0, [Phase(2.0, PURE_UTIL)], count=4) for i in range(2)], {})
    attempts, _ = POLICIES["cheapest-first"](w, config, tmp_path / "cf", lambda _n: None)
    results = job_results(w.jobs, attempts)
    assert [r.jct_hours for r in results] == pytest.approx([2.0, 4.0])
    assert [slowdown(r, config) for r in results] == pytest.approx([1.0, 2.0])


def test_select_a_virtual_cluster(tmp_path: Path) -> None:
    trace = read_trace(_trace(tmp_path))
    for name in ("c3d4", "vc-c3d4"):
        chosen = select(trace, SCHEMA, name, 5)
        assert len(chosen) == 5 and {j.project for j in chosen} == {"vc-c3d4"}
        assert chosen == [j for j in trace if j.project == "vc-c3d4"][:5]
    assert select(trace, SCHEMA, None, 7) == trace[:7]


def test_simulate_pure_on_a_virtual_cluster_twice_gives_the_same_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outs = []
    for name in ("one", "two"):
        code, out, err = run(
            capsys,
            "simulate",
            "--trace",
            str(_trace(tmp_path)),
            "--fleet",
            str(_fleet(tmp_path)),
            "--workload",
            "pure",
            "--vc",
            "e5f6",
            "--jobs",
            "12",
            "--policies",
            "slurm-cheapest,cheapest-first,gpu-agent-no-council",
            "--out",
            str(tmp_path / name),
        )
        assert code == 0, err
        assert (
            "Slowdown mean" in out and "worst project's mean slowdown against slurm-cheapest" in out
        )
        outs.append((tmp_path / name / "metrics.json").read_bytes())
    assert outs[0] == outs[1]
    doc = json.loads(outs[0])
    assert doc["meta"]["vc"] == "e5f6" and doc["meta"]["workload"]["pure"] is True
    assert doc["meta"]["jobs"] == 12
    for m in doc["policies"].values():
        assert m["slowdown_mean"] >= 1.0 and m["paused_gpu_hours"] == 0.0
        assert set(m["jct_hours"]) == {"mean", "p50", "p99"}
    worst = doc["worst_project_slowdown"]
    assert worst["against"] == "slurm-cheapest"
    assert set(worst["policies"]) == {"cheapest-first", "gpu-agent-no-council"}
    assert worst["policies"]["cheapest-first"]["project"] == "vc-e5f6"
    assert "worst project's mean slowdown" in (tmp_path / "one" / "report.md").read_text()

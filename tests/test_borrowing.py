"""slurm-cheapest-borrow (sim/borrowing.py): a queued training job borrows an idle pool's
GPUs when it finishes sooner there, is reclaimed with notice when that pool's own work
arrives, checkpoints, resumes with its progress, and nothing is lost or charged twice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fleet.config import parse_fleet
from fleet.models import Purpose
from sim.borrowing import NOTICE_S, run_borrowing
from sim.lifecycle import RESTORE_S, restored
from sim.metrics import metrics
from sim.simulate import POLICIES
from sim.workload import PURE_UTIL, Phase, Workload
from tests.test_simulate import T0, job

FLEET = """
[catalog.A100]
memory_gb = 80
price_per_hour = 4.0
relative_throughput = 1.0

[catalog.R]
memory_gb = 24
price_per_hour = 1.0
relative_throughput = 0.5

[pools]
training = ["A100"]
inference = ["R"]
research = ["R"]

[[nodes]]
name = "a100-0"
gpu_type = "A100"
gpus = 1

[[nodes]]
name = "r-0"
gpu_type = "R"
gpus = 1
"""
H = 3600.0


def workload() -> Workload:
    """A: 4 A100-hours of training at 0; B: 2 at 0 (on R at half speed it ends at 4 h,
    before A100s free at 4 h + 2 h); C: 1 h of research on R at 1 h."""
    a, b = (
        replace(job(i, "p", 0, [Phase(h, PURE_UTIL)], requested=h), supervised=True)
        for i, h in ((0, 4.0), (1, 2.0))
    )
    c = replace(
        job(2, "q", 1, [Phase(1.0, PURE_UTIL)], requested=1.0),
        purpose=Purpose.RESEARCH,
        reference="R",
    )
    return Workload([a, b, c], {})


def test_a_loan_is_reclaimed_with_notice_and_resumes_with_its_progress() -> None:
    """B borrows R at 0. C arrives at 1 h and reclaims it: B checkpoints at 1 h + 60 s with
    (3660 s x 0.5) of work done and is asked for again; C runs from 1 h + 60 s to 2 h + 60 s;
    B's rest (2 h less that work) borrows R again then, loads its checkpoint (RESTORE_S) and
    runs at half speed: it ends at 5 h and RESTORE_S (on the A100 it would end at 4 h + the
    rest, later)."""
    config = parse_fleet(FLEET)
    w = workload()
    attempts, preemptions = run_borrowing(w, config)
    assert preemptions == 1
    by_job = {i: [a for a in attempts if a.job == i] for i in range(3)}
    [a] = by_job[0]
    assert (a.gpu_type, a.outcome, a.start, a.end) == ("A100", "completed", T0, T0 + 4 * H)
    first, second = by_job[1]
    notice_end = T0 + H + NOTICE_S
    assert (first.gpu_type, first.outcome, first.start, first.end) == (
        "R",
        "preempted",
        T0,
        notice_end,
    )
    assert first.work_gpu_hours == pytest.approx((H + NOTICE_S) * 0.5 / H)
    assert (second.gpu_type, second.outcome) == ("R", "completed")
    assert second.start == pytest.approx(notice_end + H)
    assert second.done_at is not None
    assert second.done_at - T0 == pytest.approx(5 * H + RESTORE_S)
    [c] = by_job[2]
    assert (c.gpu_type, c.start, c.end) == ("R", notice_end, notice_end + H)
    # held once, charged once: B's two attempts cover [0, 1h+60s] and [2h+60s, 5h+RESTORE_S]
    assert first.cost_usd + second.cost_usd == pytest.approx(5 - 1 + RESTORE_S / H)
    m = metrics(w.jobs, attempts, config, w.budgets)
    assert m["jobs"]["completed"] == 3
    assert m["work"]["lost_gpu_hours"] == 0.0 and m["work"]["killed_attempts"] == 0
    assert m["work"]["preempted_attempts"] == 1
    assert m["total_cost_usd"] == pytest.approx(4 * 4 + 4 + 1 + RESTORE_S / H, abs=0.01)


def test_without_borrowing_the_job_waits_for_its_own_pool(tmp_path: Path) -> None:
    config = parse_fleet(FLEET)
    w = workload()
    attempts, _ = POLICIES["slurm-cheapest"](w, config, tmp_path, lambda _n: None)
    b = next(a for a in attempts if a.job == 1)
    assert (b.gpu_type, b.start, b.done_at) == ("A100", T0 + 4 * H, T0 + 6 * H)


def test_a_job_that_names_its_type_never_borrows(tmp_path: Path) -> None:
    config = parse_fleet(FLEET)
    w = workload()
    w.jobs[1] = replace(w.jobs[1], named_type="A100")
    attempts, extra = POLICIES["slurm-cheapest-borrow"](w, config, tmp_path, lambda _n: None)
    assert extra == {"preemptions": 0}
    assert {a.gpu_type for a in attempts if a.job == 1} == {"A100"}


@pytest.mark.parametrize("policy", ["slurm-cheapest-borrow", "gpu-agent-no-council-borrow"])
def test_a_job_that_needs_more_memory_than_the_lender_has_never_borrows(
    tmp_path: Path, policy: str
) -> None:
    """B sized on the 80 GB A100 (memory_gb 80): the 24 GB R is no place for it; it waits."""
    config = parse_fleet(FLEET)
    w = workload()
    w.jobs[1] = replace(w.jobs[1], memory_gb=80.0)
    attempts, _ = POLICIES[policy](w, config, tmp_path, lambda _n: None)
    assert {a.gpu_type for a in attempts if a.job == 1} == {"A100"}


def test_the_graph_borrows_the_same_way_through_the_real_ledger(tmp_path: Path) -> None:
    """gpu-agent-no-council-borrow (fleet.borrowing through the graph's own nodes; the
    supervised training jobs carry a 60 s notice): B borrows R at 0, C reclaims it at 1 h and
    starts when B yields 60 s later; B goes on from its checkpoint; all work is done, none
    lost, none killed, and B's preempted attempt is charged for what it held."""
    config = parse_fleet(FLEET)
    w = workload()
    run = POLICIES["gpu-agent-no-council-borrow"]
    attempts, _ = run(w, config, tmp_path / "borrow", lambda _n: None)
    by_job = {i: [a for a in attempts if a.job == i] for i in range(3)}
    first = by_job[1][0]
    assert (first.gpu_type, first.outcome, first.start) == ("R", "preempted", T0)
    assert first.end == pytest.approx(T0 + H + NOTICE_S)
    assert first.cost_usd == pytest.approx((H + NOTICE_S) / H * 1.0)
    [c] = by_job[2]
    assert c.start == pytest.approx(T0 + H + NOTICE_S) and c.outcome == "completed"
    m = metrics(w.jobs, attempts, config, w.budgets)
    assert m["jobs"]["completed"] == 3
    assert m["work"]["lost_gpu_hours"] == 0.0 and m["work"]["killed_attempts"] == 0
    assert m["work"]["preempted_attempts"] >= 1
    plain, _ = POLICIES["gpu-agent-no-council"](w, config, tmp_path / "plain", lambda _n: None)
    b = next(a for a in plain if a.job == 1)
    assert b.gpu_type == "A100" and b.start == pytest.approx(T0 + 4 * H)  # waited its pool


def test_a_restored_lease_covers_loading_on_the_fastest_loan() -> None:
    """Research on R (half an A100's speed, its reference) yields and asks again: its lease,
    in R's hours, grows by loading's RESTORE_S on the fastest type it may get. Where the fleet
    lends that is the A100, twice as fast, so 2 x RESTORE_S of R's hours (RESTORE_S there: a
    loan does not run out of lease before its work); where it does not, RESTORE_S on R."""
    config = parse_fleet(FLEET)
    lending = config.model_copy(
        update={"preemption": config.preemption.model_copy(update={"borrow": True})}
    )
    research = replace(
        job(0, "q", 0, [Phase(1.0, PURE_UTIL)], requested=1.0),
        purpose=Purpose.RESEARCH,
        reference="R",
        supervised=True,
        pure=True,  # so it checkpoints, as every pure job does
    )
    assert restored(research, lending).requested_hours == pytest.approx(1.0 + 2 * RESTORE_S / H)
    assert restored(research, config).requested_hours == pytest.approx(1.0 + RESTORE_S / H)

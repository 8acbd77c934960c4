"""`gpu-agent simulate` and the gpu-agent policy on traces: hand-computed answers, the same
metrics for the same seed, budgets never exceeded, bad traces refused naming the line."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from council.stream_release import shipped
from fleet.config import parse_fleet
from fleet.ledger import Ledger
from fleet.models import Purpose, ReleaseReason
from fleet.statedir import LEDGER
from fleet.trace import read_trace
from graph.cli import main
from sim.agent_replay import run_gpu_agent
from sim.lifecycle import Attempt
from sim.metrics import metrics
from sim.simulate import POLICIES, parse_policies
from sim.workload import Phase, SimJob, Workload, synthesize
from tests.conftest import SHARED

TINY_FLEET = """
[catalog.A100]
memory_gb = 80
price_per_hour = 4.0
relative_throughput = 1.0

[catalog.H100]
memory_gb = 80
price_per_hour = 6.0
relative_throughput = 2.0

[catalog.T4]
memory_gb = 16
price_per_hour = 0.5
relative_throughput = 0.25

[pools]
training = ["A100", "H100"]
inference = ["T4"]
research = ["T4"]

[[nodes]]
name = "a100-0"
gpu_type = "A100"
gpus = 4

[[nodes]]
name = "h100-0"
gpu_type = "H100"
gpus = 2

[[nodes]]
name = "t4-0"
gpu_type = "T4"
gpus = 2
"""
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
PHILLY = SHARED / "traces" / "philly.csv"


def held_s(a: Attempt) -> float:
    """How long the attempt held its GPUs, in seconds."""
    assert a.start is not None and a.end is not None
    return a.end - a.start


def job(
    i: int,
    project: str,
    at_h: float,
    phases: list[Phase],
    count: int = 1,
    requested: float = 4.0,
    named: str | None = None,
) -> SimJob:
    return SimJob(
        id=i,
        project=project,
        submit=T0 + at_h * 3600,
        count=count,
        purpose=Purpose.TRAINING,
        named_type=named,
        reference=named or "A100",
        requested_hours=requested,
        pad=2.0,
        phases=tuple(phases),
    )


def test_gpu_agent_releases_the_idle_tail_and_routes_by_work(tmp_path: Path) -> None:
    """One job, 2 h of work on the A100 reference then a 3 h idle tail, 8 h asked for.
    gpu-agent routes it to the H100 ($6/h at twice the speed beats $4/h): the work takes
    1 h; the tick at 1 h 00 reads the idle tail, and 30 idle minutes later, at 1 h 30, the
    monitor releases the GPUs: cost 6 x 1.5 = $9, hoarded 30 min. naive holds its 8 h lease
    on the dearest type (H100): $48, 7 h hoarded."""
    config = parse_fleet(TINY_FLEET)
    w = Workload([job(0, "p", 0, [Phase(2.0, 80.0), Phase(3.0, 0.0)], requested=8.0)], {"p": 100.0})
    run = run_gpu_agent(w, config, tmp_path / "agent")
    [a] = run.attempts
    assert (a.gpu_type, a.outcome, a.reason) == ("H100", "completed", "idle")
    assert held_s(a) == pytest.approx(90 * 60)
    assert a.cost_usd == pytest.approx(9.0)
    assert a.hoarded_gpu_hours == pytest.approx(0.5)
    assert a.done_at == pytest.approx(T0 + 3600)
    m = metrics(w.jobs, run.attempts, config, w.budgets)
    assert m["useful_gpu_hours"] == pytest.approx(2.0)
    assert m["cost_per_useful_gpu_hour"] == pytest.approx(9.0 / 2.0)
    assert m["jct_hours"]["mean"] == pytest.approx(1.0)
    naive, _ = POLICIES["naive"](w, config, tmp_path / "naive", lambda _n: None)
    [b] = naive
    assert b.gpu_type == "H100" and b.cost_usd == pytest.approx(48.0)
    assert b.hoarded_gpu_hours == pytest.approx(7.0)


def test_the_stream_release_lets_a_tail_go_when_the_stream_reads_as_ended(
    tmp_path: Path,
) -> None:
    """`[monitor] idle_release = "stream"`: 2 h of work on the named A100 at 80 %, half of
    the 4 h lease, then a 3 h idle tail. The shipped model reads the work and the lease and
    releases at the idle stretch's first 5-minute tick where the 30-minute timeout waits 30;
    the same job, the same work, 25 GPU-minutes less hoarded."""
    tail = [Phase(2.0, 80.0), Phase(3.0, 0.0)]
    w = Workload([job(0, "p", 0, tail, requested=4.0, named="A100")], {"p": 100.0})
    stream = parse_fleet(TINY_FLEET + '\n[monitor]\nidle_release = "stream"\n')
    [a] = run_gpu_agent(w, stream, tmp_path / "stream").attempts
    [b] = run_gpu_agent(w, parse_fleet(TINY_FLEET), tmp_path / "timeout").attempts
    assert shipped().after(((80.0, 2.0),), 4.0) == pytest.approx(5 / 60)
    assert (a.outcome, a.reason, b.outcome) == ("completed", "idle", "completed")
    assert held_s(a) == pytest.approx(125 * 60) and held_s(b) == pytest.approx(150 * 60)
    assert a.hoarded_gpu_hours == pytest.approx(5 / 60)
    assert a.work_gpu_hours == b.work_gpu_hours == pytest.approx(2.0)


def test_a_pause_longer_than_the_idle_timeout_kills_the_job_and_it_runs_again(
    tmp_path: Path,
) -> None:
    """Work 1 h, a 45-minute pause, work 1 h (on the named A100, so no speed-up): the monitor
    releases the GPUs 30 idle minutes into the pause; the training job resumes from its
    checkpoint (the first work phase is kept), its user asks again when the pause is over
    (at 1 h 45), saying which allocation the request resumes. Killed work is paid for, and
    counted: two attempts, the second completes, and the first's idle half hour is no longer
    hoarding in the project's record: it was a pause."""
    config = parse_fleet(TINY_FLEET)
    w = Workload(
        [
            job(
                0,
                "p",
                0,
                [Phase(1.0, 80.0), Phase(0.75, 0.0), Phase(1.0, 80.0)],
                requested=4.0,
                named="A100",
            )
        ],
        {"p": 1000.0},
    )
    first, second = run_gpu_agent(w, config, tmp_path / "agent").attempts
    assert (first.outcome, first.reason, second.outcome) == ("killed", "idle", "completed")
    # the tick at 1 h 00 reads the pause; idle for 30 min -> released at 1 h 30
    assert held_s(first) == pytest.approx(90 * 60)
    assert first.cost_usd == pytest.approx(4.0 * 1.5)
    assert first.start is not None
    assert second.submit == pytest.approx(first.start + 105 * 60)
    assert second.start == pytest.approx(second.submit)
    assert second.work_gpu_hours == pytest.approx(1.0)  # only the rest of the work
    ledger = Ledger(str(tmp_path / "agent" / LEDGER), config)
    try:
        (resumed,) = [r for r in ledger.history() if r.reason is ReleaseReason.IDLE]
        assert resumed.hoarded_hours == 0.0  # the pause was not hoarding
    finally:
        ledger.close()


def test_a_job_under_gpu_agent_run_pauses_and_its_tail_goes_after_the_command(
    tmp_path: Path,
) -> None:
    """The same job, run through `gpu-agent run`: its 45-minute pause is a pause (the
    command runs), so nothing is killed; when the command exits at 2 h 45 the work is done
    and the 3 h idle tail is released at the first tick that reads it idle, hoarding
    nothing."""
    config = parse_fleet(TINY_FLEET)
    phases = [Phase(1.0, 80.0), Phase(0.75, 0.0), Phase(1.0, 80.0), Phase(3.0, 0.0)]
    supervised = replace(job(0, "p", 0, phases, requested=8.0, named="A100"), supervised=True)
    [a] = run_gpu_agent(Workload([supervised], {"p": 1000.0}), config, tmp_path / "agent").attempts
    assert (a.outcome, a.reason) == ("completed", "idle")
    assert held_s(a) == pytest.approx(2.75 * 3600)
    assert a.hoarded_gpu_hours == pytest.approx(0.0)
    assert a.paused_gpu_hours == pytest.approx(0.75)  # the pause, paid for: not a saving


GUARDED_TINY_FLEET = (
    TINY_FLEET
    + """
[council]
policy = "reference"
auto_approve_max_gpus = 0
deny_threshold = 0.01
guard_share = 0.01
approve_threshold = 0.999
"""
)


@pytest.mark.parametrize("complies", [False, True])
def test_an_owner_told_to_use_gpu_agent_run_keeps_its_work_where_it_complies(
    tmp_path: Path, complies: bool
) -> None:
    """The same paused job, unsupervised, approved with guardrails (`gpu-agent run`
    required, else an idle release after 10 min). An owner who ignores it loses the first
    attempt 10 idle minutes into the 45-minute pause (at 1 h 10); the rerun, which resumes
    what that idle release ended, does the rest from the checkpoint and completes. An owner
    who complies runs the work under `gpu-agent run`: nothing is killed, and the tail goes
    when the command exits."""
    config = parse_fleet(GUARDED_TINY_FLEET)
    phases = [Phase(1.0, 80.0), Phase(0.75, 0.0), Phase(1.0, 80.0), Phase(3.0, 0.0)]
    owner = replace(job(0, "p", 0, phases, requested=8.0, named="A100"), complies=complies)
    run = run_gpu_agent(Workload([owner], {"p": 1000.0}), config, tmp_path / "agent")
    assert run.council == {"approved_with_guardrails": len(run.attempts)}
    if complies:
        [a] = run.attempts
        assert (a.outcome, a.reason, a.hoarded_gpu_hours) == ("completed", "idle", 0.0)
        assert held_s(a) == pytest.approx(2.75 * 3600)
        return
    first, second = run.attempts
    assert (first.outcome, first.reason) == ("killed", "idle")
    assert held_s(first) == pytest.approx(70 * 60)
    assert (second.outcome, second.reason) == ("completed", "idle")
    assert second.work_gpu_hours == pytest.approx(1.0)


def test_budgets_hold_under_gpu_agent(tmp_path: Path) -> None:
    """A project whose budget covers two of its five jobs: gpu-agent denies the rest before
    spending; its spend never passes the budget (the naive policy overruns it)."""
    config = parse_fleet(TINY_FLEET)
    jobs = [job(i, "p", i * 0.1, [Phase(1.0, 80.0)], requested=1.0, named="A100") for i in range(5)]
    w = Workload(jobs, {"p": 9.0})  # each job's lease costs $4
    run = run_gpu_agent(w, config, tmp_path / "agent")
    m = metrics(w.jobs, run.attempts, config, w.budgets)
    assert m["budget_violations"]["count"] == 0
    assert m["per_project"]["p"]["cost_usd"] <= 9.0
    assert m["jobs"]["denied"] == 3
    attempts, _ = POLICIES["naive"](w, config, tmp_path / "n", lambda _n: None)
    naive = metrics(w.jobs, attempts, config, w.budgets)
    assert naive["budget_violations"]["count"] == 1
    assert naive["budget_violations"]["usd"] == pytest.approx(20.0 - 9.0)


def test_the_councils_compared_on_the_same_jobs(tmp_path: Path) -> None:
    """gpu-agent-no-council approves every request the council would vote on (2-GPU jobs:
    none is small enough to skip it); gpu-agent-rules and gpu-agent convene theirs on the
    same requests."""
    config = parse_fleet(TINY_FLEET)
    w = Workload(
        [job(i, "p", i * 0.1, [Phase(1.0, 80.0)], count=2, requested=1.0) for i in range(4)], {}
    )
    counts = {}
    for name in ("gpu-agent", "gpu-agent-rules", "gpu-agent-no-council"):
        attempts, extra = POLICIES[name](w, config, tmp_path / name, lambda _n: None)
        assert metrics(w.jobs, attempts, config, w.budgets)["work_share"] == 1.0
        counts[name] = extra["council"]
    assert counts["gpu-agent-no-council"]["approved"] == 4
    assert all(sum(c.values()) == 4 and c["auto_approved"] == 0 for c in counts.values())


def _trace(tmp_path: Path) -> Path:
    """A small trace in the Philly shape, rows out of time order."""
    rows = ["timestamp,duration,num_gpus,gpu_time,cluster"]
    for i in range(60):
        minute = (i * 37) % 600
        rows.append(
            f"2017-10-0{1 + i % 3} {minute // 60:02d}:{minute % 60:02d}:00,"
            f"{600 + (i * 733) % 20000},{[1, 1, 2, 4, 8][i % 5]},0,"
            f"{['a1b2', 'c3d4', 'e5f6'][i % 3]}"
        )
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_simulate_writes_the_report_and_the_same_seed_gives_the_same_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _trace(tmp_path)
    outs = []
    for name in ("one", "two"):
        code, out, err = run(
            capsys,
            "simulate",
            "--trace",
            str(trace),
            "--out",
            str(tmp_path / name),
            "--fleet",
            str(_fleet(tmp_path)),
            "--policies",
            "naive,slurm-like,gpu-agent",
        )
        assert code == 0, err
        assert "jobs" in err and "[" in err  # the progress bar
        assert "naive" in out and "slurm-like" in out and "gpu-agent" in out
        assert "calibration: mean utilisation" in out
        outs.append((tmp_path / name / "metrics.json").read_bytes())
    agent = json.loads(outs[0])["policies"]["gpu-agent"]
    assert sum(agent["council"].values()) == agent["node_runs"]["council"] > 0
    assert agent["node_runs"]["validate"] >= 60  # every job, and every rerun
    assert outs[0] == outs[1]
    for f in ("report.md", "cost_over_time.png", "utilisation.png", "jct.png", "project_share.png"):
        assert (tmp_path / "one" / f).stat().st_size > 0
    assert (tmp_path / "one" / "gpu-agent" / "ledger.sqlite").exists()
    assert (tmp_path / "one" / "gpu-agent" / "fleet.toml").exists()
    other = run(
        capsys,
        "simulate",
        "--trace",
        str(trace),
        "--out",
        str(tmp_path / "three"),
        "--fleet",
        str(_fleet(tmp_path)),
        "--policies",
        "gpu-agent",
        "--seed",
        "7",
    )
    assert other[0] == 0
    assert json.loads((tmp_path / "three" / "metrics.json").read_text())["meta"]["seed"] == 7
    # a fleet whose council cannot load: refused before anything under --out is touched (it
    # was refused once the gpu-agent policy started, its earlier run's ledger emptied)
    missing = tmp_path / "missing.toml"
    weights = f'[council]\nweights = "{tmp_path / "none.pt"}"\n'
    missing.write_text(_fleet(tmp_path).read_text() + weights)
    ledger = tmp_path / "one" / "gpu-agent" / "ledger.sqlite"
    before = ledger.read_bytes()
    code, _, err = run(
        capsys, "simulate", "--trace", str(trace), "--out", str(tmp_path / "one"),
        "--fleet", str(missing), "--policies", "naive,gpu-agent",
    )  # fmt: skip
    assert code == 2 and "cannot load council weights" in err and err.count("\n") == 1
    assert ledger.read_bytes() == before
    assert "none.pt" not in (tmp_path / "one" / "naive" / "fleet.toml").read_text()


def _fleet(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(TINY_FLEET.replace("gpus = 4", "gpus = 8").replace("gpus = 2", "gpus = 8"))
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "naive,fastest"], "unknown policy 'fastest'"),
        (["--policies", "naive,naive"], "named twice"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--vc", "nope"], "no virtual cluster 'nope' in the trace"),
        (["--workload", "pure", "--habits", "1.5"], "--habits has no meaning with --workload pure"),
        (["--run-compliance", "1.5"], "--run-compliance must be from 0 to 1, not 1.5"),
        (["--run-compliance", "nan"], "--run-compliance must be from 0 to 1, not nan"),
        (
            ["--workload", "pure", "--run-compliance", "0.5"],
            "--run-compliance has no meaning with --workload pure",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run(
        capsys, "simulate", "--trace", str(_trace(tmp_path)), "--out", str(tmp_path / "o"), *args
    )
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_a_bad_trace_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "timestamp,duration,num_gpus,cluster\n2017-10-01 00:00:00,60,1,a\n"
        "2017-10-01 00:01:00,-5,1,a\n"
    )
    code, _, err = run(capsys, "simulate", "--trace", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{bad}:3:" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_policy_names() -> None:
    assert parse_policies("naive, gpu-agent") == ["naive", "gpu-agent"]


@pytest.mark.skipif(not PHILLY.exists(), reason="needs ../shared/traces/philly.csv")
def test_philly_head_under_gpu_agent_keeps_every_budget(tmp_path: Path) -> None:
    """The first 1,500 jobs of the real trace on the trace fleet: every job ends in one
    final state, no project spends past its budget, and routing left no H100 queue while
    A100s were free (the simulator found that failure; routing now avoids it)."""
    from importlib import resources

    text = resources.files("fleet").joinpath("data", "trace_fleet.toml").read_text()
    config = parse_fleet(text)
    w = synthesize(read_trace(PHILLY, limit=1500), config)
    run_ = run_gpu_agent(w, config, tmp_path / "agent")
    m = metrics(w.jobs, run_.attempts, config, w.budgets)
    assert m["budget_violations"] == {"count": 0, "usd": 0.0}
    jobs = m["jobs"]
    assert jobs["completed"] + jobs["failed"] + jobs["denied"] + jobs["unplaced"] == 1500
    assert jobs["completed"] > 1300


def test_trace_gpus_read_the_job_placed_on_them() -> None:
    """Work at its utilisation, pauses and the tail at 0 % with memory held (the H200
    recording's hoard phase), free GPUs idle; `steady_until` is the end of the phase."""
    from sim.lifecycle import timeline
    from sim.telemetry import TraceFleet

    config = parse_fleet(TINY_FLEET)
    fleet = TraceFleet(config)
    gpu = next(g for g in fleet.inventory() if g.gpu_type == "A100").uuid
    j = job(0, "p", 0, [Phase(1.0, 80.0), Phase(0.5, 0.0)], named="A100")
    fleet.run([gpu], timeline(j, "A100", T0, config))
    held = {gpu: "p"}
    [work] = fleet.sample([gpu], T0 + 60, held)
    [tail] = fleet.sample([gpu], T0 + 3600 + 60, held)
    [free] = fleet.sample([gpu], T0 + 60, {})
    assert (work.util_pct, tail.util_pct, free.util_pct) == (80.0, 0.0, 0.0)
    assert tail.mem_used_gb and free.mem_used_gb is not None
    assert tail.mem_used_gb > free.mem_used_gb
    assert fleet.steady_until([gpu], T0 + 60) == T0 + 3600
    assert fleet.steady_until([gpu], T0 + 3600 + 60) == T0 + 3600 + 1800
    assert fleet.steady_until([gpu], T0 + 9 * 3600) == float("inf")


@pytest.mark.skipif(not PHILLY.exists(), reason="needs ../shared/traces/philly.csv")
def test_a_philly_slice_does_the_work_near_the_floor(tmp_path: Path) -> None:
    """The first 5,000 jobs under every policy (issue: "never throw work away"). gpu-agent
    fails no job, overruns no budget, costs at most 1.05 x the floor, queues and finishes no
    later than slurm-cheapest, hoards at most a tenth of what slurm-like does, and does at
    least 0.999 of the work of the best baseline, which all overrun budgets (the work they
    did within the budgets is less)."""
    from importlib import resources

    from sim import DEFAULT_POLICIES
    from sim.simulate import simulate

    text = resources.files("fleet").joinpath("data", "trace_fleet.toml").read_text()
    sim = simulate(
        PHILLY,
        DEFAULT_POLICIES,
        parse_fleet(text),
        "trace_fleet.toml",
        tmp_path,
        jobs=5000,
        stream=io.StringIO(),
    )
    r, agent = sim.results, sim.results["gpu-agent"]
    baselines = {n: m for n, m in r.items() if n != "gpu-agent"}
    assert agent["jobs"]["failed"] == 0
    assert agent["work_share"] >= 0.999 * max(m["work_share"] for m in baselines.values())
    assert agent["work_share_in_budget"] == agent["work_share"]
    assert all(m["work_share_in_budget"] < m["work_share"] for m in baselines.values())
    assert agent["budget_violations"] == {"count": 0, "usd": 0.0}
    assert agent["cost_vs_floor"] <= 1.05
    assert agent["hoarded_gpu_hours"] <= 0.10 * r["slurm-like"]["hoarded_gpu_hours"]
    assert agent["queue_hours"]["mean"] <= r["slurm-cheapest"]["queue_hours"]["mean"]
    assert agent["jct_hours"]["p50"] <= r["slurm-cheapest"]["jct_hours"]["p50"]
    same = sim.across["same_work"]["policies"]
    assert same["gpu-agent"]["cost_vs_floor"] < min(
        v["cost_vs_floor"] for n, v in same.items() if n != "gpu-agent"
    )


def test_gpu_agent_moves_a_queued_job_and_no_move_keeps_it(tmp_path: Path) -> None:
    """The H100s (cheaper per unit of work) are held for 10 h, the A100s for 1 h; a job that
    names no type queues behind them. gpu-agent (`move_queued` on by default) moves it to
    the A100s once they free; gpu-agent-no-move keeps it waiting for the H100s."""
    config = parse_fleet(TINY_FLEET)
    w = Workload(
        [
            job(0, "p", 0.0, [Phase(10.0, 90.0)], count=2, requested=10.0, named="H100"),
            job(1, "p", 0.0, [Phase(1.0, 90.0)], count=4, requested=1.0, named="A100"),
            job(2, "p", 0.1, [Phase(2.0, 90.0)], count=2, requested=4.0),
        ],
        {},
    )
    started: dict[str, tuple[str | None, float]] = {}
    for name in ("gpu-agent", "gpu-agent-no-move"):
        attempts, _ = POLICIES[name](w, config, tmp_path / name, lambda _n: None)
        assert metrics(w.jobs, attempts, config, w.budgets)["work_share"] == 1.0
        [a] = [a for a in attempts if a.job == 2]
        assert a.start is not None
        started[name] = (a.gpu_type, (a.start - T0) / 3600)
    moved, stayed = started["gpu-agent"], started["gpu-agent-no-move"]
    assert moved[0] == "A100" and moved[1] == pytest.approx(1.0, abs=0.05)
    assert stayed[0] == "H100" and stayed[1] == pytest.approx(10.0, abs=0.05)


def test_an_out_that_cannot_be_a_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "o"
    code, _, err = run(capsys, "simulate", "--trace", str(_trace(tmp_path)), "--out", str(out))
    assert code == 2 and f"--out {out}: {blocker} is a file, not a directory" in err
    assert err.count("\n") == 1

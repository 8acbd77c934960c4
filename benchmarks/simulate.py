"""How fast a trace goes through the gpu-agent policy (the full graph), and how time grows.

    .venv/bin/python benchmarks/simulate.py [--trace ../shared/traces/philly.csv]
        [--scaling] [--jobs 1000,10000] [--fleets 64,512,4096] [--statements N]

Times read + synthesize + the gpu-agent run (every job through validate, council, route,
allocate, monitor and deallocate with the real ledger), not the report. With --scaling it first
prints a table over job counts and fleet sizes: fleets are the trace fleet's type mix scaled
to the size, and the trace's arrivals are stretched or squeezed by 1,024 / size so that every
fleet carries the load per GPU that the 1,024-GPU fleet does. The last line is always the
whole trace on the trace fleet: `jobs=... seconds=... jobs_per_s=...`. With --statements N it
only counts the SQL statements the ledger executes for the first N jobs.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.config import FleetConfig, NodeSpec, parse_fleet
from fleet.trace import Job, read_trace
from sim.agent_replay import AgentRun, run_gpu_agent
from sim.workload import synthesize

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "philly.csv"
BASE_GPUS = 1024


def trace_fleet() -> FleetConfig:
    text = resources.files("fleet").joinpath("data", "trace_fleet.toml").read_text("utf-8")
    return parse_fleet(text, source="trace_fleet.toml")


def scaled(config: FleetConfig, gpus: int) -> FleetConfig:
    """The same type mix with about `gpus` GPUs (at least one node of each type)."""
    by_type: dict[str, list[NodeSpec]] = {}
    for node in config.nodes:
        by_type.setdefault(node.gpu_type, []).append(node)
    nodes = []
    for gpu_type, group in by_type.items():  # the trace fleet's nodes of a type are alike
        want = max(1, round(len(group) * gpus / BASE_GPUS))
        nodes += [
            group[0].model_copy(update={"name": f"{gpu_type.lower()}-{i}"}) for i in range(want)
        ]
    return config.model_copy(update={"nodes": nodes})


def squeezed(jobs: list[Job], factor: float) -> list[Job]:
    """Arrivals `factor` times further apart (factor < 1: closer together)."""
    t0 = jobs[0].submit
    return [Job(j.project, t0 + (j.submit - t0) * factor, j.count, j.hours, j.line) for j in jobs]


def timed(jobs: list[Job], config: FleetConfig) -> tuple[float, AgentRun]:
    start = time.perf_counter()
    workload = synthesize(jobs, config)
    with tempfile.TemporaryDirectory(prefix="gpu-agent-bench-") as tmp:
        run = run_gpu_agent(workload, config, Path(tmp) / "state")
    return time.perf_counter() - start, run


def statements(jobs: list[Job], config: FleetConfig) -> int:
    """The SQL statements a run of `jobs` executes (sqlite3's trace callback, every connection)."""
    count = 0
    real = sqlite3.connect

    def counted(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        def one(_statement: str) -> None:
            nonlocal count
            count += 1

        db: sqlite3.Connection = real(*args, **kwargs)
        db.set_trace_callback(one)
        return db

    setattr(sqlite3, "connect", counted)  # noqa: B010 (mypy refuses a plain assignment)
    try:
        timed(jobs, config)
    finally:
        setattr(sqlite3, "connect", real)  # noqa: B010
    return count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--jobs", default="1000,10000")
    parser.add_argument("--fleets", default="64,512,4096")
    parser.add_argument(
        "--statements", type=int, metavar="N", help="only count the SQL statements of N jobs"
    )
    args = parser.parse_args()
    if args.statements is not None and args.statements < 1:
        parser.error(f"--statements must be at least 1, not {args.statements}")
    base = trace_fleet()
    started = time.perf_counter()
    trace = read_trace(args.trace)
    read_s = time.perf_counter() - started
    if args.statements is not None:
        n = statements(trace[: args.statements], base)
        print(f"jobs={args.statements} sql_statements={n} per_job={n / args.statements:.1f}")
        return 0
    if args.scaling:
        print(f"{'jobs':>7} {'GPUs':>5} {'seconds':>8} {'jobs/s':>7} {'node runs':>10}")
        for gpus in (int(g) for g in args.fleets.split(",")):
            config = scaled(base, gpus)
            fleet = sum(n.gpus for n in config.nodes)
            for n in (int(j) for j in args.jobs.split(",")):
                jobs = squeezed(trace[:n], BASE_GPUS / fleet)
                seconds, run = timed(jobs, config)
                print(
                    f"{len(jobs):>7,} {fleet:>5,} {seconds:>8.1f} {len(jobs) / seconds:>7.0f} "
                    f"{sum(run.steps.values()):>10,}",
                    flush=True,
                )
    seconds, run = timed(trace, base)
    seconds += read_s
    print(f"node runs: {dict(run.steps)}; council: {dict(run.council)}; reviews {run.reviews}")
    print(f"jobs={len(trace)} seconds={seconds:.1f} jobs_per_s={len(trace) / seconds:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

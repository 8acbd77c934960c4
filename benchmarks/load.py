"""Load test: several `gpu-agent worker` processes on one PostgreSQL database, one killed.

2,000 seeded requests (six projects, three with budgets; 1 to 8 GPUs; a quarter to two
virtual hours) are submitted at once to the job queue over a 64-GPU simulated fleet whose
clock runs 3,600 times faster than wall time (one virtual hour a second). Four workers serve
them; once 40 % are done one worker is killed with SIGKILL and the others take its threads
over from their Postgres checkpoints when its leases run out. Then the ledger is checked:

- no double-booking: per GPU, the allocations' held intervals never overlap, and no GPU is
  still held;
- no budget overrun: every project's spend is within its budget;
- exactly one terminal state per request: every job done, its outcome the thread's last
  checkpoint's status, every placed allocation released, charged and written to history
  exactly once.

    .venv/bin/python benchmarks/load.py [--database postgresql://...] [--requests 2000]

Without --database it starts a private PostgreSQL server (fsync on) in a temporary folder.
It prints throughput and latency (submit -> done, and claim -> done of the last claim), then
the checks; it exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/council.py would shadow the council package

from fleet.config import load_fleet  # noqa: E402
from fleet.jobs import JobQueue  # noqa: E402
from fleet.ledger import Ledger  # noqa: E402
from fleet.models import GPURequest, Status  # noqa: E402
from graph.orchestrator import Orchestrator  # noqa: E402

FLEET = """
[clock]
time_scale = 3600

[monitor]
tick_seconds = 600

[scheduler]
poll_seconds = 900

[council]
auto_approve_max_gpus = 8
auto_approve_max_usd = 100000

[catalog.A100]
memory_gb = 80
price_per_hour = 5.12
relative_throughput = 1.0
tdp_watts = 400

[catalog.H100]
memory_gb = 80
price_per_hour = 8.0
relative_throughput = 2.0
tdp_watts = 700

[catalog.L4]
memory_gb = 24
price_per_hour = 0.80
relative_throughput = 0.3
tdp_watts = 72

[pools]
training = ["A100", "H100"]
inference = ["L4"]
research = ["A100"]
"""
NODES = [("a100", "A100", 4), ("h100", "H100", 2), ("l4", "L4", 2)]  # 8 GPUs per node
PROJECTS = ["vision", "speech", "nlp", "robotics", "ranking", "search"]
BUDGETS = {"robotics": 3000.0, "ranking": 2000.0, "search": 1000.0}  # the others: none
TERMINAL = {Status.RELEASED, Status.DENIED, Status.INVALID, Status.TIMED_OUT}


def fleet_toml() -> str:
    nodes = [
        f'\n[[nodes]]\nname = "{name}-{i}"\ngpu_type = "{t}"\ngpus = 8\nrack = "rack-{i % 2}"\n'
        for name, t, n in NODES
        for i in range(n)
    ]
    return FLEET + "".join(nodes)


def requests(n: int, seed: int) -> list[GPURequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        purpose = rng.choices(["training", "inference", "research"], [5, 3, 2])[0]
        count = rng.choices([1, 2, 4, 8], [8, 4, 2, 1])[0] if purpose != "inference" else 1
        out.append(
            GPURequest(
                project=rng.choice(PROJECTS),
                purpose=purpose,
                count=count,
                duration_hours=rng.choice([0.25, 0.5, 1.0, 2.0]),
                request_id=f"load-{seed}-{i}",
            )
        )
    return out


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def check(database: str, state: Path, fleet: Path, n: int) -> list[str]:
    """What went wrong (nothing, if the run kept its promises)."""
    config = load_fleet(str(fleet))
    problems = []
    with Orchestrator(state, str(fleet), database=database, create=False) as orch:
        ledger = orch.services.ledger
        jobs = JobQueue(ledger).jobs()
        if len(jobs) != n or any(j.state != "done" for j in jobs):
            problems.append(f"jobs: {Counter(j.state for j in jobs)} of {n}")
        for j in jobs:
            status = orch.outcome(j.thread_id).status
            if status not in TERMINAL or j.outcome != status.value:
                problems.append(f"{j.thread_id}: job {j.outcome}, thread {status.value}")
        rows = ledger.allocations()
        if any(r.state != "released" for r in rows):
            problems.append(f"allocations not released: {Counter(r.state for r in rows)}")
        placed = sorted(r.id for r in rows if r.started_at is not None)
        charges = sorted(r[0] for r in ledger.query("SELECT allocation_id FROM charges"))
        history = ledger.query("SELECT allocation_id, gpu_ids, started_at, ended_at FROM history")
        if not placed == charges == sorted(h[0] for h in history):
            problems.append("charges, history and placed allocations differ")
        spans: dict[str, list[tuple[float, float]]] = {}
        for _, gpus, start, end in history:
            for g in json.loads(gpus):
                spans.setdefault(g, []).append((start, end))
        overlaps = sum(b[0] < a[1] - 1e-6 for s in spans.values() for a, b in pairwise(sorted(s)))
        if overlaps or ledger.holders():
            problems.append(f"double-booked: {overlaps} overlaps, {len(ledger.holders())} held")
        for cost in ledger.costs(time.time()):
            budget = BUDGETS.get(cost.project) or config.budgets.get(cost.project)
            if budget is not None and cost.spent_usd > budget + 1e-6:
                problems.append(f"{cost.project} spent ${cost.spent_usd:.2f} of ${budget:.2f}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database", help="a postgresql:// URL (default: a private server)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=24, help="threads per worker")
    ap.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="SIGKILL one worker when this share is done (0: never)",
    )
    ap.add_argument("--lease-seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gpu-agent-load-"))
    server = None
    database = args.database
    if database is None:
        from tests.pgserver import PgServer, create_database

        server = PgServer(Path(f"/tmp/gpu-agent-load-pg-{os.getpid()}"), durable=True)
        database = create_database(server.start(), "load")
    try:
        return run(args, database, tmp)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.root, ignore_errors=True)


def run(args: argparse.Namespace, database: str, tmp: Path) -> int:
    fleet = tmp / "fleet.toml"
    fleet.write_text(fleet_toml())
    state = tmp / "state"
    state.mkdir()
    n = args.requests
    with Orchestrator(state, str(fleet), database=database) as orch:
        for project, usd in BUDGETS.items():
            orch.set_budget(project, usd)
        for i, req in enumerate(requests(n, args.seed)):
            orch.submit(req, thread_id=f"t{i:05d}")
    opts = ["--state-dir", str(state), "--fleet", str(fleet), "--database", database]
    log = open(tmp / "workers.log", "w")  # noqa: SIM115
    start = time.time()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "graph.cli",
                "worker",
                "--json",
                "--concurrency",
                str(args.concurrency),
                "--lease-seconds",
                str(args.lease_seconds),
                "--poll-seconds",
                "0.25",
                "--exit-when-idle",
                *opts,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        for _ in range(args.workers)
    ]
    killed = False
    ledger = Ledger(database, load_fleet(str(fleet)))
    queue = JobQueue(ledger)
    try:
        while any(w.poll() is None for w in workers):
            done = queue.counts()["done"]
            if not killed and args.kill_at and done >= args.kill_at * n:
                workers[0].send_signal(signal.SIGKILL)
                killed = True
                print(
                    f"SIGKILL worker pid {workers[0].pid} at {time.time() - start:.1f} s "
                    f"({done} of {n} done)",
                    flush=True,
                )
            time.sleep(0.2)
        wall = time.time() - start
        jobs = queue.jobs()
    finally:
        ledger.close()
    finished = [json.loads(w.stdout.read() or "{}") for w in workers if w.stdout]
    e2e = [j.finished_at - j.submitted_at for j in jobs if j.finished_at]
    run_s = [j.finished_at - j.claimed_at for j in jobs if j.finished_at and j.claimed_at]
    taken = sum(j.attempts > 1 for j in jobs)
    print(
        f"requests {n}  workers {args.workers} x {args.concurrency} threads  "
        f"fleet 64 GPUs  database PostgreSQL"
    )
    print(f"outcomes {dict(Counter(j.outcome for j in jobs))}")
    print(
        f"per worker {[sum(f.get('finished', {}).values()) for f in finished]} "
        f"(the first was killed); {taken} jobs taken over from it"
    )
    print(f"wall {wall:.1f} s  throughput {n / wall:.1f} requests/s")
    print(
        f"latency submit->done p50 {pct(e2e, 50):.2f} s p99 {pct(e2e, 99):.2f} s; "
        f"claim->done p50 {pct(run_s, 50):.2f} s p99 {pct(run_s, 99):.2f} s"
    )
    problems = check(database, state, fleet, n)
    for p in problems[:20]:
        print("FAIL", p)
    print(
        "checks: "
        + (
            "all passed (no double-booking, no overrun, one terminal state each)"
            if not problems
            else f"{len(problems)} failed"
        )
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

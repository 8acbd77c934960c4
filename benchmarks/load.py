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

Then the wake-up delay across processes: a request queued in a `gpu-agent worker` behind the
one GPU this script holds, released at a random moment of the worker's poll (`--wake-poll`,
2 s, on the real clock): how long from the release until the worker placed it, with
LISTEN/NOTIFY (`[scheduler] notify = true`, the default) and without (its next poll), both
in the same run (`--wake-trials` each, 10), and their ratio.

    .venv/bin/python benchmarks/load.py [--database postgresql://...] [--requests 2000]
    .venv/bin/python benchmarks/load.py --wake-only

Without --database it starts a private PostgreSQL server (fsync on) in a temporary folder.
It prints throughput and latency (submit -> done, and claim -> done of the last claim), then
the checks, then the wake-up delays; it exits 1 if a check fails.
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
from collections.abc import Callable
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/council.py would shadow the council package

from fleet.config import load_fleet  # noqa: E402
from fleet.jobs import JobQueue  # noqa: E402
from fleet.ledger import Ledger  # noqa: E402
from fleet.ledger.rows import LedgerRow  # noqa: E402
from fleet.models import GPURequest, Status  # noqa: E402
from graph.orchestrator import Orchestrator  # noqa: E402

TIMING = """
[clock]
time_scale = 3600

[monitor]
tick_seconds = 600

[scheduler]
poll_seconds = 900
"""
TYPES = """
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
T = TypeVar("T")
# where a job may end: also `pending_review`, a request the council asks a human about (the
# human finishes it with `gpu-agent resume`), for which nothing is placed
ENDS = {Status.RELEASED, Status.DENIED, Status.INVALID, Status.TIMED_OUT, Status.PENDING_REVIEW}
# The wake-up measurement: the real clock, one H100, ticks of a second (a released waiter's
# thread ends at its next tick); the load's TYPES (catalog, pools, council).
WAKE_FLEET = """
[monitor]
tick_seconds = 1

[scheduler]
poll_seconds = {poll}
notify = {notify}

[[nodes]]
name = "h100-0"
gpu_type = "H100"
gpus = 1
rack = "rack-0"
"""
WAKE_ASK = {"project": "vision", "gpu_type": "H100", "count": 1, "duration_hours": 1.0}


def fleet_toml(notify: bool = True) -> str:
    nodes = [
        f'\n[[nodes]]\nname = "{name}-{i}"\ngpu_type = "{t}"\ngpus = 8\nrack = "rack-{i % 2}"\n'
        for name, t, n in NODES
        for i in range(n)
    ]
    timing = TIMING if notify else TIMING + "notify = false\n"  # the last table: [scheduler]
    return timing + TYPES + "".join(nodes)


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
            if status not in ENDS or j.outcome != status.value:
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
        "--max-waiting",
        type=int,
        default=None,
        help="jobs waiting for GPUs beside them, per worker (default: the worker's)",
    )
    ap.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="SIGKILL one worker when this share is done (0: never)",
    )
    ap.add_argument("--lease-seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--wake-trials", type=int, default=10, help="per mode (0: none)")
    ap.add_argument("--wake-poll", type=float, default=2.0, help="the waiter's poll, seconds")
    ap.add_argument("--wake-only", action="store_true", help="only the wake-up delays")
    ap.add_argument(
        "--no-notify", action="store_true", help="the load run without LISTEN/NOTIFY (polls)"
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gpu-agent-load-"))
    server = None
    database = args.database
    if database is None:
        from tests.pgserver import PgServer, create_database

        server = PgServer(Path(f"/tmp/gpu-agent-load-pg-{os.getpid()}"), durable=True)
        admin = server.start()
        database = create_database(admin, "load")
    try:
        failed = 0 if args.wake_only else run(args, database, tmp)
        if args.wake_trials:
            given = database  # --database: both modes on it, one after the other
            fresh = (lambda: create_database(admin)) if server is not None else (lambda: given)
            wake(args, fresh, tmp)
        return failed
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.root, ignore_errors=True)


def run(args: argparse.Namespace, database: str, tmp: Path) -> int:
    fleet = tmp / "fleet.toml"
    fleet.write_text(fleet_toml(not args.no_notify))
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
                *([] if args.max_waiting is None else ["--max-waiting", str(args.max_waiting)]),
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
        f"fleet 64 GPUs  database PostgreSQL  NOTIFY {'off' if args.no_notify else 'on'}"
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


def wake(args: argparse.Namespace, fresh: Callable[[], str], tmp: Path) -> None:
    """The wake-up delays with and without LISTEN/NOTIFY, each on a fresh database."""
    rng = random.Random(args.seed)
    delays = {mode: wake_delays(args, fresh(), tmp, mode, rng) for mode in (True, False)}
    on, off = (statistics.mean(delays[m]) for m in (True, False))
    print(
        f"wake-up after a release in another process ({args.wake_trials} trials each, the "
        f"waiter's poll {args.wake_poll:g} s):"
    )
    for mode, name in ((True, "LISTEN/NOTIFY"), (False, "polling only")):
        d = sorted(delays[mode])
        print(
            f"  {name:<14} mean {1000 * statistics.mean(d):7.1f} ms  p50 "
            f"{1000 * statistics.median(d):7.1f} ms  max {1000 * d[-1]:7.1f} ms"
        )
    print(f"  ratio polling / NOTIFY {off / on:.1f}")


def wake_delays(
    args: argparse.Namespace, database: str, tmp: Path, notify: bool, rng: random.Random
) -> list[float]:
    """Seconds from each release to the worker's placement of the request queued behind it."""
    where = tmp / f"wake-{notify}"
    where.mkdir()
    fleet = where / "fleet.toml"
    fleet.write_text(TYPES + WAKE_FLEET.format(poll=args.wake_poll, notify=str(notify).lower()))
    opts = ["--state-dir", str(where / "state"), "--fleet", str(fleet), "--database", database]
    worker = subprocess.Popen(
        [sys.executable, "-m", "graph.cli", "worker", "--concurrency", "4", *opts],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(where / "worker.log", "w"),  # noqa: SIM115
    )
    out = []
    try:
        with Orchestrator(where / "state", str(fleet), database=database) as orch:
            ledger = orch.services.ledger
            for i in range(args.wake_trials):
                held = orch.request(WAKE_ASK, wait=False).allocation
                assert held is not None
                job = orch.submit(WAKE_ASK, thread_id=f"wake-{i}")
                queued = until(partial(_allocation, ledger, job.thread_id, "queued"))
                time.sleep(0.5 + rng.uniform(0, args.wake_poll))  # asleep, at a random phase
                released = time.time()
                orch.release(held.id)
                placed = until(partial(_allocation, ledger, job.thread_id, "active"))
                assert placed.id == queued.id and placed.started_at is not None
                out.append(placed.started_at - released)
                orch.release(placed.id)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    return out


def _allocation(ledger: Ledger, thread_id: str, state: str) -> LedgerRow | None:
    return next((r for r in ledger.allocations(state) if r.thread_id == thread_id), None)


def until(found: Callable[[], T | None], timeout: float = 120) -> T:
    """Poll every 10 ms until `found` gives something."""
    give_up = time.monotonic() + timeout
    while (got := found()) is None:
        if time.monotonic() > give_up:
            raise SystemExit("the wake-up measurement got no answer in 120 s")
        time.sleep(0.01)
    return got


if __name__ == "__main__":
    sys.exit(main())

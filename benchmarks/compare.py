"""How two checkouts of gpu-agent compare on the simulator, as a ratio measured in one run.

    .venv/bin/python benchmarks/compare.py OLD_CHECKOUT NEW_CHECKOUT [--jobs 15000] [--runs 2]
        [--side-by-side] [--trace ../shared/traces/philly.csv]

Each run times `sim.agent_replay.run_gpu_agent` alone (every job through the graph's nodes with the
real ledger) on the first N jobs of the trace and the trace fleet, in a fresh process whose
imports come from one checkout; runs alternate between the checkouts so that the machine's
drift hits both, or with --side-by-side run both at once, one per core (drift that comes and
goes within minutes then hits both alike). Prints each time, then `old=... new=... ratio=...`
(medians; ratio = new / old) and whether both made the same decisions (every attempt's job,
outcome and cost). A checkout is a directory holding the project's packages, e.g.
`git worktree add /tmp/old REV`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = """
import sys, tempfile, time
from importlib import resources
from pathlib import Path
from fleet.config import parse_fleet
from fleet.trace import read_trace
try:
    from sim.agent_replay import run_gpu_agent
except ImportError:  # a checkout from before the module's rename
    from sim.gpu_agent import run_gpu_agent
from sim.workload import synthesize
jobs = read_trace(sys.argv[1])[: int(sys.argv[2])]
text = resources.files("fleet").joinpath("data", "trace_fleet.toml").read_text("utf-8")
config = parse_fleet(text)
workload = synthesize(jobs, config)
with tempfile.TemporaryDirectory(prefix="gpu-agent-compare-") as tmp:
    start = time.perf_counter()
    run = run_gpu_agent(workload, config, Path(tmp) / "state")
    seconds = time.perf_counter() - start
decisions = repr([(a.job, a.attempt, a.outcome, round(a.cost_usd, 6)) for a in run.attempts])
print(hashlib.sha256(decisions.encode()).hexdigest()[:16], seconds)
"""


def start(checkout: Path, trace: str, jobs: int) -> subprocess.Popen[str]:
    env = dict(os.environ) | {"PYTHONPATH": str(checkout)}
    return subprocess.Popen(
        [sys.executable, "-c", "import hashlib\n" + ONE_RUN, trace, str(jobs)],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[str, float]:
    """(a digest of the run's decisions, its seconds)."""
    out, _ = process.communicate()
    if process.returncode:
        raise SystemExit(f"a run failed (exit {process.returncode})")
    digest, seconds = out.split()[-2:]
    return digest, float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--jobs", type=int, default=15000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--side-by-side", action="store_true")
    parser.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "philly.csv"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {"old": [], "new": []}
    digests: set[str] = set()
    checkouts = {"old": args.old.resolve(), "new": args.new.resolve()}
    for checkout in checkouts.values():
        if not any((checkout / "sim" / f).is_file() for f in ("agent_replay.py", "gpu_agent.py")):
            parser.error(f"{checkout} is not a gpu-agent checkout")
    for _ in range(args.runs):
        batches = [list(checkouts)] if args.side_by_side else [[name] for name in checkouts]
        for batch in batches:
            running = {name: start(checkouts[name], args.trace, args.jobs) for name in batch}
            for name, process in running.items():
                digest, seconds = finish(process)
                digests.add(digest)
                times[name].append(seconds)
                print(f"{name} {seconds:.1f} s", flush=True)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"old={old:.1f} new={new:.1f} ratio={new / old:.3f} same_decisions={len(digests) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

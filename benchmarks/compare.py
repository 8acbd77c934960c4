"""How two checkouts of gpu-agent compare on the simulator, as a ratio measured in one run.

    .venv/bin/python benchmarks/compare.py OLD_CHECKOUT NEW_CHECKOUT [--jobs 15000] [--runs 2]
        [--trace ../shared/traces/philly.csv]

Each run times `sim.gpu_agent.run_gpu_agent` alone (every job through the graph's nodes with the
real ledger) on the first N jobs of the trace and the trace fleet, in a fresh process whose
imports come from one checkout; runs alternate between the checkouts so that the machine's
drift hits both. Prints each time, then `old=... new=... ratio=...` (medians; ratio = new / old).
A checkout is a directory holding the project's packages, e.g. `git worktree add /tmp/old REV`.
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
from sim.gpu_agent import run_gpu_agent
from sim.workload import synthesize
jobs = read_trace(sys.argv[1])[: int(sys.argv[2])]
text = resources.files("fleet").joinpath("data", "trace_fleet.toml").read_text("utf-8")
config = parse_fleet(text)
workload = synthesize(jobs, config)
with tempfile.TemporaryDirectory(prefix="gpu-agent-compare-") as tmp:
    start = time.perf_counter()
    run_gpu_agent(workload, config, Path(tmp) / "state")
    print(time.perf_counter() - start)
"""


def one_run(checkout: Path, trace: str, jobs: int) -> float:
    env = dict(os.environ) | {"PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", ONE_RUN, trace, str(jobs)], cwd=checkout,
                          env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--jobs", type=int, default=15000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "philly.csv"))
    args = parser.parse_args()
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.runs):
        for name, checkout in (("old", args.old), ("new", args.new)):
            seconds = one_run(checkout.resolve(), args.trace, args.jobs)
            times[name].append(seconds)
            print(f"{name} {seconds:.1f} s", flush=True)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"old={old:.1f} new={new:.1f} ratio={new / old:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

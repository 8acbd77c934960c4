"""The mean JCT no scheduler can beat on a trace slice: every job starting at its submission
on the fastest type it may use (a named type: that type; else its pool's, or another pool's
it could borrow: sim.accounting.allowed_types), running its work there alone. Issue 21
judges mean JCT against slurm-cheapest; this says how much of a goal is left once nothing
queues, by purpose. `jct_at_floor_price_mean_hours` is the same with every job on the type
the cost floor prices it at (sim.accounting.floor_type): no policy that pays no more a unit
of work than the floor finishes sooner on average.

    .venv/bin/python benchmarks/jct_floor.py [--fleet benchmarks/fleet_128.toml] \\
        [--vc 6c71a0] [--jobs 1000] [--workload pure|normal]

On the normal workload a job's mid-job pauses count as on any type and its idle tail not at
all, so the figure is below what any policy reaches there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.config import load_fleet
from fleet.trace import PHILLY, read_trace
from sim.accounting import fastest_hours, floor_type, pause_hours
from sim.lifecycle import speed
from sim.simulate import select
from sim.workload import WorkloadSettings, synthesize

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "philly.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--fleet", default="benchmarks/fleet_128.toml")
    p.add_argument("--vc", default="6c71a0")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--workload", choices=["pure", "normal"], default="pure")
    args = p.parse_args()
    config = load_fleet(args.fleet)
    vc = args.vc or None
    jobs = select(
        read_trace(args.trace, PHILLY, limit=None if vc else args.jobs), PHILLY, vc, args.jobs
    )
    settings = replace(WorkloadSettings(), pure=args.workload == "pure")
    hours: dict[str, list[float]] = defaultdict(list)
    at_floor_price = []
    for job in synthesize(jobs, config, settings).jobs:
        hours[job.purpose.value].append(fastest_hours(job, config))
        cheapest = floor_type(job, config)
        at_floor_price.append(job.work_hours / speed(job, cheapest, config) + pause_hours(job))
    every = [h for hs in hours.values() for h in hs]
    print(f"{len(every)} jobs ({args.workload}) on {args.fleet}, vc {vc or 'all'}:")
    for purpose, hs in sorted(hours.items()):
        print(f"  {purpose}: {len(hs)} jobs, mean {statistics.mean(hs):.2f} h")
    print(f"jct_floor_mean_hours={statistics.mean(every):.2f}")
    print(f"jct_at_floor_price_mean_hours={statistics.mean(at_floor_price):.2f}")


if __name__ == "__main__":
    main()

"""Pause or ending: the fixed idle timeout against a CfC, a GRU and a logistic regression that
read the utilisation stream (sim/idle_stream.py, council/stream.py), on the trace's jobs.

    .venv/bin/python benchmarks/idle_stream.py [--trace ../shared/traces/philly.csv]
        [--jobs N] [--steps 1500] [--seed 0] [--habits 0] [--save NPZ]

Per policy on the last 30 % of the trace's span: the pauses it cut (released before the
work came back) and the share of the tails' GPU-hours it held before releasing. Each model's
threshold is chosen on the 10 % before to cut no more pauses there than the timeout it is
matched to; "held at equal cuts" compares it with the curves of the fixed timeouts and of
the monitor's own rule (the timeout, but never before 1.5 x the longest pause seen) on the
test slice, interpolated at the model's cuts: below 1, it holds less of the tails for as
many cuts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from council.stream_release import save
from fleet.config import parse_fleet
from fleet.trace import read_trace
from sim.idle_stream import compare, on_the_curve, train_release
from sim.simulate import fleet_source
from sim.workload import WorkloadSettings, synthesize

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "philly.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--jobs", type=int, help="only the earliest N jobs")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--habits", type=float, default=0.0, help="simulate --habits")
    parser.add_argument(
        "--save",
        metavar="NPZ",
        help='instead: train the GRU the monitor releases by (idle_release = "stream"), its '
        "threshold matched to the trace fleet's own rule, and write it here",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    name, text = fleet_source(None)
    config = parse_fleet(text, source=name)
    settings = WorkloadSettings(seed=args.seed, habit_sigma=args.habits)
    jobs = synthesize(read_trace(args.trace, limit=args.jobs), config, settings).jobs
    started = time.perf_counter()
    if args.save:
        state, threshold, figures = train_release(
            jobs, config.monitor, args.seed, args.steps, log=print
        )
        meta = {
            "trained_on": f"{len(jobs)} jobs of {Path(args.trace).name}, workload seed "
            f"{args.seed}, habits {args.habits:g}, {args.steps} steps",
            "matched_to": "the trace fleet's own idle rule (fleet/data/trace_fleet.toml)",
            **figures,
        }
        save(Path(args.save), state, threshold, meta)
        print(json.dumps({"threshold": threshold, **figures}, indent=1))
        print(f"wrote {args.save} ({time.perf_counter() - started:.0f} s)")
        return
    got = compare(jobs, seed=args.seed, steps=args.steps, log=print)
    rows = got["policies"]
    assert isinstance(rows, dict)
    print(
        f"{len(jobs):,} jobs of {Path(args.trace).name}, seed {args.seed}, habits "
        f"{args.habits:g}; idle stretches (train / thresholds / test): "
        + " / ".join(f"{n:,}" for n in got["episodes"].values())  # type: ignore[attr-defined]
        + f"; a tick every {got['tick_minutes']:g} min, at most {got['max_wait_hours']:g} h"
    )
    rules = ("timeout", "monitor")
    curves = {rule: [v for k, v in rows.items() if k.startswith(rule)] for rule in rules}
    print(
        f"{'policy':<22} {'cut':>6} {'cut share':>9} {'held share':>10}   "
        "held at equal cuts, against the timeout / the monitor's rule"
    )
    for key, r in rows.items():
        ratios = (
            ""
            if key.startswith(rules)
            else " / ".join(f"{on_the_curve(r, curves[rule]):.3f}" for rule in rules)
        )
        print(f"{key:<22} {r['cut']:>6} {r['cut_share']:>9.3f} {r['held_share']:>10.3f}   {ratios}")
    print(f"seconds: {time.perf_counter() - started:.0f}")


if __name__ == "__main__":
    main()

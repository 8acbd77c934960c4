"""Whom to burden: the hoarding a council's guardrails remove against the share of the voted
requests they burden, by the council trained on outcomes, the reference rules, size alone and
at random, on the whole trace.

    .venv/bin/python benchmarks/guard_frontier.py [--trace ../shared/traces/philly.csv]
        [--jobs N] [--habits 1.5] [--compliance 1] [--workers 2]
        [--learned 0.19,0.37,0.64] [--rules 0.75,0.78,0.82]
        [--learned-size 148,47,24] [--rules-size 80,23,10] [--size 192,48,24]

Guardrails ("`gpu-agent run` required, else idle release after `guard_idle_minutes`") cost
the owner who follows them a habit and remove the idle tail of the work they guard; a
council's ranking is worth what it saves at a given burden. Each point is one `gpu-agent
simulate` run of the trace fleet with `[council] deny_threshold` and `guard_share` 0.000001
and `quorum = 1` (no denials, no human band, one outright approver enough), so that whom it
guards follows the council alone: by its probability (`--learned`, `--rules`: every voted
request under `approve_threshold = T` guarded, the rest approved plainly), or by the
GPU-hours at risk (`--learned-size`, `--rules-size`: `guard_gpu_hours = G`, guardrails where
(1 - p) x the GPU-hours asked reach G), or with no council by size alone (`--size`: where
half the GPU-hours asked reach G). `--compliance` is `simulate --run-compliance`. The two
ends are no council (nothing guarded) and the reference rules at T = 0.999999 (every voted
request guarded). Guarding a share s of the voted requests at random removes, in
expectation, s of the hoarding between the two ends (each guarded allocation's tail goes
whoever else is guarded): the "random" column; "vs random" is the hoarding a point leaves
over what random guarding leaves at its share. Runs take 5 to 6 minutes each on the whole
trace; `--workers` run at once.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.config import parse_fleet
from sim.simulate import simulate
from sim.workload import WorkloadSettings

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "philly.csv"
NONE = 0.000001  # a threshold the fleet file accepts for "nothing" (no denials, no human)
ALL = 0.999999  # approve nothing plainly: every voted request guarded
BY_SIZE = 0.000002  # approve_threshold where G decides: just above deny, so no cheaper type


@dataclass(frozen=True)
class Point:
    label: str
    policy: str  # simulate's
    threshold: float | None = None  # approve_threshold; None: the trace fleet as it is
    gpu_hours: float | None = None  # guard_gpu_hours


def fleet_text(point: Point) -> str:
    """The trace fleet, with the band that guards as `point` says."""
    text = resources.files("fleet").joinpath("data", "trace_fleet.toml").read_text("utf-8")
    if point.threshold is None:
        return text
    text += (
        f'\n[council]\nweights = "outcome"\ndeny_threshold = {NONE}\nguard_share = {NONE}\n'
        f"approve_threshold = {point.threshold}\nquorum = 1\n"
    )
    return text + ("" if point.gpu_hours is None else f"guard_gpu_hours = {point.gpu_hours}\n")


def run(point: Point, trace: str, jobs: int | None, habits: float, compliance: float) -> Any:
    text, policy = fleet_text(point), point.policy
    settings = WorkloadSettings(habit_sigma=habits, run_compliance=compliance)
    with tempfile.TemporaryDirectory() as out:
        sim = simulate(
            trace,
            [policy],
            parse_fleet(text, source="trace_fleet.toml"),
            "trace_fleet.toml",
            Path(out),
            jobs=jobs,
            stream=io.StringIO(),
            fleet_text=text,
            settings=settings,
        )
    return sim.results[policy]


def guarded_share(result: dict[str, Any]) -> float:
    """Of the requests the council voted on, the share approved with guardrails."""
    votes = {k: v for k, v in result["council"].items() if k != "auto_approved"}
    total = sum(votes.values())
    return votes.get("approved_with_guardrails", 0) / total if total else 0.0


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--jobs", type=int, help="only the earliest N jobs")
    parser.add_argument("--habits", type=float, default=1.5, help="simulate --habits")
    parser.add_argument("--compliance", type=float, default=1.0, help="--run-compliance")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--learned", default="0.19,0.37,0.64", help="approve thresholds")
    parser.add_argument("--rules", default="0.75,0.78,0.82", help="approve thresholds")
    parser.add_argument("--learned-size", default="148,47,24", help="guard_gpu_hours")
    parser.add_argument("--rules-size", default="80,23,10", help="guard_gpu_hours")
    parser.add_argument("--size", default="192,48,24", help="guard_gpu_hours, no council")
    args = parser.parse_args()
    if not 0 <= args.compliance <= 1 or args.workers < 1:  # also refuses nan
        parser.error("--compliance must be from 0 to 1 and --workers at least 1")
    points = [
        Point("no council", "gpu-agent-no-council"),
        Point("rules, all", "gpu-agent-rules", ALL),
    ]
    for label, policy, given in (
        ("learned", "gpu-agent", args.learned),
        ("rules", "gpu-agent-rules", args.rules),
    ):
        points += [Point(label, policy, float(t)) for t in given.split(",") if t]
    for label, policy, given in (
        ("learned x size", "gpu-agent", args.learned_size),
        ("rules x size", "gpu-agent-rules", args.rules_size),
        ("size alone", "gpu-agent-no-council", args.size),
    ):
        points += [Point(label, policy, BY_SIZE, float(g)) for g in given.split(",") if g]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [
            pool.submit(run, p, args.trace, args.jobs, args.habits, args.compliance) for p in points
        ]
        results = [f.result() for f in futures]
    none, everything = results[0]["hoarded_gpu_hours"], results[1]["hoarded_gpu_hours"]
    print(
        f"{args.jobs or 'all':} jobs of {Path(args.trace).name}, habits {args.habits:g}, "
        f"run compliance {args.compliance:g}; hoarded GPU-hours: {none:,.1f} with nothing "
        f"guarded, {everything:,.1f} with every voted request guarded"
    )
    print(
        f"{'policy':<16} {'T':>8} {'G':>5} {'voted':>6} {'guarded':>8} {'work share':>10} "
        f"{'hoarded':>10} {'random':>10} {'vs random':>9} {'$/unit':>7} {'killed':>6} "
        f"{'failed':>6}"
    )
    for point, r in zip(points, results, strict=True):
        share = guarded_share(r)
        random = none - share * (none - everything)
        voted = sum(v for k, v in r["council"].items() if k != "auto_approved")
        print(
            f"{point.label:<16} {_g(point.threshold):>8} {_g(point.gpu_hours):>5} {voted:>6} "
            f"{share:>8.3f} {r['work_share']:>10.4%} {r['hoarded_gpu_hours']:>10,.1f} "
            f"{random:>10,.1f} {r['hoarded_gpu_hours'] / random:>9.3f} "
            f"{r['cost_per_work_unit']:>7.3f} {r['work']['killed_attempts']:>6} "
            f"{r['jobs']['failed']:>6}"
        )


if __name__ == "__main__":
    main()

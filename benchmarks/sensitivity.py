"""Does a conclusion hang on one synthetic parameter? The same trace slice under three pause
models and two settings of each idle timeout, every baseline beside gpu-agent in each run.

    .venv/bin/python benchmarks/sensitivity.py [--trace ../shared/traces/philly.csv]
        [--jobs 5000] [--done 0,5] [--training 30,240]
        [--models lognormal,exponential,pareto]

Pause models are sim.workload's (PAUSE_MODELS); `done` is the trace fleet's
`monitor.idle_timeout_done_minutes` (the idle tail after a command exits), `training` its
timeout for a training allocation with no command known (`idle_timeout_by_purpose`). One row
per (model, done, training): gpu-agent's work share and against the most work a baseline did
within the budgets (metrics' work_share_in_budget), the jobs
the policy failed and denied, cost against the floor for gpu-agent and the strongest baseline,
hoarded GPU-hours against slurm-like's and budget violations.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.config import FleetConfig, parse_fleet
from fleet.models import Purpose
from sim.simulate import simulate
from sim.workload import PAUSE_MODELS, WorkloadSettings

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "philly.csv"
POLICIES = ["slurm-like", "slurm-cheapest", "cheapest-first", "gpu-agent"]


def fleet(done: float, training: float) -> FleetConfig:
    text = resources.files("fleet").joinpath("data", "trace_fleet.toml").read_text("utf-8")
    config = parse_fleet(text, source="trace_fleet.toml")
    by_purpose = config.monitor.idle_timeout_by_purpose | {Purpose.TRAINING: training}
    monitor = config.monitor.model_copy(
        update={"idle_timeout_done_minutes": done, "idle_timeout_by_purpose": by_purpose}
    )
    return config.model_copy(update={"monitor": monitor})


def row(
    model: str, done: float, training: float, results: dict[str, Any], across: dict[str, Any]
) -> str:
    agent = results["gpu-agent"]
    base = {n: m for n, m in results.items() if n != "gpu-agent"}
    best_share = max(m["work_share_in_budget"] for m in base.values())
    strongest = across["strongest_baseline"]
    hoard = agent["hoarded_gpu_hours"] / results["slurm-like"]["hoarded_gpu_hours"]
    return (
        f"{model:<12} {done:>5g} {training:>8g} {agent['work_share']:>8.4f} "
        f"{agent['work_share'] / best_share:>10.4f} {agent['jobs']['failed']:>6} "
        f"{agent['jobs']['denied']:>6} {agent['cost_vs_floor']:>9.3f} "
        f"{results[strongest]['cost_vs_floor']:>9.3f} {strongest:>15} {hoard:>9.3f} "
        f"{agent['budget_violations']['count']:>5}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(TRACE))
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--done", default="0,5")
    parser.add_argument("--training", default="30,240")
    parser.add_argument("--models", default=",".join(PAUSE_MODELS))
    args = parser.parse_args()
    print(
        f"{args.jobs:,} jobs of {Path(args.trace).name}, seed 0; gpu-agent's figures "
        f"against the baselines {', '.join(POLICIES[:-1])}"
    )
    print(
        f"{'pauses':<12} {'done':>5} {'training':>8} {'work':>8} {'vs best':>10} {'failed':>6} "
        f"{'denied':>6} {'floor x':>9} {'best x':>9} {'strongest':>15} {'hoard/sl':>9} "
        f"{'over':>5}"
    )
    for model in args.models.split(","):
        for done in (float(t) for t in args.done.split(",")):
            for training in (float(t) for t in args.training.split(",")):
                with tempfile.TemporaryDirectory() as out:
                    sim = simulate(
                        args.trace,
                        POLICIES,
                        fleet(done, training),
                        "trace_fleet.toml",
                        Path(out),
                        jobs=args.jobs,
                        stream=io.StringIO(),
                        settings=WorkloadSettings(pause_model=model),
                    )
                print(row(model, done, training, sim.results, sim.across), flush=True)
    print(
        "work: gpu-agent's work share; vs best: over the most work a baseline did within "
        "the budgets; failed: jobs the "
        "policy killed that reruns could not finish; floor x: cost against the floor "
        "(gpu-agent, the strongest baseline); hoard/sl: hoarded GPU-hours against "
        "slurm-like's; over: budget violations"
    )


if __name__ == "__main__":
    main()

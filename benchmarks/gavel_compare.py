"""Issue 21's comparison with Gavel, reproduced: the same pure-work jobs through Gavel's
simulator (Narayanan et al., OSDI'20, github.com/stanford-futuredata/gavel), beside ours.

    .venv/bin/python benchmarks/gavel_compare.py --gavel /tmp/gavel \\
        --gavel-python /tmp/gavel-venv/bin/python [--models benchmarks/gavel_speeds.toml] \\
        [--vc 6c71a0] [--jobs 1000] [--fleet benchmarks/fleet_128.toml] \\
        [--variants five,five-memory,mapped] [--policies max_min_fairness_perf,fifo] \\
        [--round-s 360] [--ours] [--check-driver] [--out /tmp/gavel-compare]

It takes the jobs `gpu-agent simulate --workload pure --vc 6c71a0 --jobs 1000` runs
(sim.simulate.select and sim.workload.synthesize, so the same purpose, GPU count, arrival,
work and memory per job; with --models, the same per-job workload as `--models` draws) and
writes, for Gavel, a trace (scheduler/traces' ten-column format: one job type per purpose and
workload, `total_steps` = the job's work in seconds on its pool's reference type x
STEPS_PER_SECOND, arrivals in seconds after the first) and a throughputs file
(`{type: {"('job type', scale factor)": {"null": steps per second}}}`: the job's speed on the
type over its reference type's, sim.lifecycle.speed, x STEPS_PER_SECOND; with --models, the
file's per-model speeds, so Gavel's own per-model spread as benchmarks/gavel_speeds.toml
maps it). The cluster is the fleet file's GPUs per type; Gavel's servers are its nodes.
Gavel then runs as a subprocess of its own virtual environment, and its mean, p50 and p99
JCT (hours, from the per-job completion times it prints) are printed beside the command for
ours (or ours run too, with --ours).

Gavel hardcodes its worker types: the driver (scripts/drivers/simulate_scheduler_with_trace
.py) builds the cluster as `v100:p100:k80`, and the scheduler's round
(`Scheduler._schedule_jobs_on_workers`) places jobs only on `["v100", "p100", "k80"]`. Our
five types cannot run through it unmodified, so there are three variants:

- `mapped`: Gavel's driver and scheduler unmodified, our five types merged into its three
  (MAPPED: v100 = H100; p100 = A100 + RTX4090; k80 = V100 + T4), each merged type's
  throughput the GPU-weighted mean of its members' for the job, so the cluster's capacity is
  kept and every job may run on any type; approximate (an RTX4090 runs at 0.97 of an A100
  there, a T4 and a V100 both at 0.30).
- `five`: our five types as they are, through a driver of ours that makes the calls Gavel's
  driver makes, with one line of Gavel's scheduler changed at import time (the list above
  becomes our types, fastest first, as Gavel's is; no file of the checkout is written);
  every job may run on every type with at least its GPU count.
- `five-memory`: as `five`, with throughput 0 (Gavel's "cannot run here", which its round
  skips) on the types our pure workload would not give the job: its pool's types and the
  other pools' types with the memory it needs (training 80 GB: A100, H100; research 24 GB:
  not a T4; inference: any), as our borrowing policies allow (sim.accounting.allowed_types).

`--check-driver` runs `mapped` through our driver too, with nothing replaced: it gives Gavel's
driver's per-job JCTs bit for bit, so `five` differs from Gavel only by the replaced line.

Gavel's policy names: `max_min_fairness_perf` is its heterogeneity-aware max-min fairness,
`max_min_fairness` the heterogeneity-agnostic one (every throughput 1 in the LP),
`fifo` first come first served. Rounds of 360 s (its driver's default; --round-s), seed 0,
ECOS.
Gavel needs numpy, scipy, cvxpy, ecos, grpcio, grpcio-tools, psutil, scikit-learn and
matrix_completion in its environment and its RPC stubs built (`make rpc_stubs` in
scheduler/); its code is never copied here.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.config import FleetConfig, parse_fleet
from fleet.trace import PHILLY, read_trace
from sim.accounting import allowed_types
from sim.lifecycle import speed
from sim.simulate import fleet_source, select, with_models
from sim.workload import SimJob, WorkloadSettings, synthesize

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "philly.csv"
STEPS_PER_SECOND = 100.0  # Gavel counts whole steps per 360 s round: enough for a T4's share
GAVEL_TYPES = ("v100", "p100", "k80")  # what Gavel's driver and round know, fastest first
MAPPED = {"v100": ("H100",), "p100": ("A100", "RTX4090"), "k80": ("V100", "T4")}
VARIANTS = ("five", "five-memory", "mapped")
# The one line of Gavel's scheduler.py that `five` replaces (Scheduler._schedule_jobs_on_workers).
HARDCODED = 'worker_types = ["v100", "p100", "k80"]'
# Gavel's heterogeneity-agnostic FIFO gives each job one whole type, whatever its throughput
# there: with a type a job cannot run on, it waits there for ever (tried: 633 jobs waiting, every
# GPU idle, after 23 simulated days), so it is not run where throughput 0 says so.
SKIP = {("five-memory", "fifo"): "FIFO puts jobs on types they cannot run on, and they wait"}
OURS_POLICIES = "slurm-cheapest,gpu-agent-no-council-maxmin-borrow,gpu-agent-no-council-las-borrow"

# Run by Gavel's python: the calls of its scripts/drivers/simulate_scheduler_with_trace.py,
# with the cluster given as a dict (its driver's `-c` knows v100:p100:k80 only) and, where a
# replacement is given, scheduler.py's hardcoded list of worker types replaced at import time.
DRIVER = """
import importlib.util, json, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["scheduler_dir"])
path = args["scheduler_dir"] + "/scheduler.py"
source = open(path).read()
if args["replace"] is not None:
    old, new = args["replace"]
    assert source.count(old) == 1, "Gavel's scheduler.py does not have the line to replace"
    source = source.replace(old, new)
spec = importlib.util.spec_from_loader("scheduler", loader=None, origin=path)
module = importlib.util.module_from_spec(spec)
module.__file__ = path
sys.modules["scheduler"] = module
exec(compile(source, path, "exec"), module.__dict__)
import utils
jobs, arrival_times = utils.parse_trace(args["trace"])
policy = utils.get_policy(args["policy"], solver=args["solver"], seed=args["seed"])
sched = module.Scheduler(policy, throughputs_file=args["throughputs"], simulate=True,
                         seed=args["seed"], time_per_iteration=args["round_s"])
sched.simulate(args["cluster"], arrival_times, jobs,
               num_gpus_per_server=args["per_server"], jobs_to_complete=None)
sched.get_average_jct(None)
sched.get_cluster_utilization()
sched.shutdown()
"""


@dataclass(frozen=True)
class Result:
    variant: str
    policy: str
    jobs: int  # completed
    mean_h: float
    p50_h: float
    p99_h: float
    seconds: float  # wall time of Gavel's run


def gavel_types(config: FleetConfig) -> list[str]:
    """The fleet's types that have GPUs, fastest first (Gavel's own order, v100 p100 k80)."""
    present = [t for t in config.catalog if config.gpus_of_type(t) > 0]
    return sorted(present, key=lambda t: -config.catalog[t].relative_throughput)


def per_server(config: FleetConfig, gpu_type: str) -> int:
    """Gavel's GPUs per server for a type: the fleet's nodes of it (the largest, when mixed)."""
    return max(n.gpus for n in config.nodes if n.gpu_type == gpu_type)


def job_type(job: SimJob) -> str:
    """Gavel's job type: one per purpose and workload (their speeds and memory are alike)."""
    return f"{job.purpose.value}/{job.workload or 'average'}"


def eligible(job: SimJob, config: FleetConfig, memory: bool) -> set[str]:
    """The types the job may run on: with `memory`, the pure workload's (its pool's and the
    loans it may take); else all with at least its GPU count (Gavel's any job, any type)."""
    if memory:
        return set(allowed_types(job, config))
    return {t for t in config.catalog if config.gpus_of_type(t) >= job.count}


def throughputs(
    jobs: Sequence[SimJob], config: FleetConfig, variant: str
) -> dict[str, dict[str, dict[str, float]]]:
    """Gavel's throughputs file: per worker type, per (job type, scale factor), steps/s."""
    out: dict[str, dict[str, dict[str, float]]] = collections.defaultdict(dict)
    for job in jobs:
        key = str((job_type(job), job.count))
        if variant == "mapped":
            for name, members in MAPPED.items():
                gpus = sum(config.gpus_of_type(t) for t in members)
                mean = sum(speed(job, t, config) * config.gpus_of_type(t) for t in members) / gpus
                out[name][key] = {"null": mean * STEPS_PER_SECOND if gpus >= job.count else 0.0}
        else:
            ok = eligible(job, config, memory=variant == "five-memory")
            for t in gavel_types(config):
                v = speed(job, t, config) * STEPS_PER_SECOND if t in ok else 0.0
                out[t][key] = {"null": v}
    return dict(out)


def check_keys(
    table: Mapping[str, Mapping[str, Mapping[str, float]]], jobs: Sequence[SimJob]
) -> None:
    """Every (job type, scale factor) has one throughput per type, whatever the job's order."""
    for job in jobs:
        key = str((job_type(job), job.count))
        speeds = [table[t][key]["null"] for t in table]
        if not any(v > 0 for v in speeds):
            raise SystemExit(f"job {job.id} ({key}) can run on no type of the cluster")


def trace_lines(jobs: Sequence[SimJob]) -> list[str]:
    """Gavel's trace (utils.parse_trace): job type, command, working directory, steps
    argument, needs data dir, total steps, scale factor, priority weight, SLO, arrival (s)."""
    first = min(j.submit for j in jobs)
    lines = []
    for job in sorted(jobs, key=lambda j: (j.submit, j.id)):
        steps = max(1, round(job.work_hours * 3600.0 * STEPS_PER_SECOND))
        fields = [job_type(job), f"job-{job.id}", ".", "--steps", "0", str(steps)]
        fields += [str(job.count), "1", "-1", f"{job.submit - first:.3f}"]
        lines.append("\t".join(fields))
    return lines


def cluster(config: FleetConfig, variant: str) -> tuple[dict[str, int], dict[str, int]]:
    """(GPUs, GPUs per server) per Gavel worker type."""
    if variant == "mapped":
        gpus = {n: sum(config.gpus_of_type(t) for t in ts) for n, ts in MAPPED.items()}
        servers = {n: max(per_server(config, t) for t in ts) for n, ts in MAPPED.items()}
        return gpus, servers
    types = gavel_types(config)
    return {t: config.gpus_of_type(t) for t in types}, {t: per_server(config, t) for t in types}


def run_gavel(
    gavel: Path,
    python: str,
    variant: str,
    policy: str,
    config: FleetConfig,
    work: Path,
    timeout: float,
    round_s: int,
    our_driver: bool = False,
) -> tuple[list[float] | None, float]:
    """Gavel's per-job completion times (s), None if it ran past `timeout`, and its wall time;
    its output is kept under `work`. `mapped` runs through Gavel's driver unless `our_driver`
    (then through ours, with nothing replaced: the check that ours makes Gavel's calls)."""
    scheduler_dir = gavel / "scheduler"
    gpus, servers = cluster(config, variant)
    trace, tput = work / "gavel.trace", work / f"throughputs-{variant}.json"
    name = f"{variant}-{policy}" + ("-our-driver" if our_driver else "")
    stdout, stderr = work / f"{name}.out", work / f"{name}.err"
    if variant == "mapped" and not our_driver:  # Gavel's own driver, unmodified
        command = [
            python,
            str(scheduler_dir / "scripts" / "drivers" / "simulate_scheduler_with_trace.py"),
            *("-t", str(trace), "-p", policy, "--throughputs_file", str(tput)),
            *("-c", ":".join(str(gpus[t]) for t in GAVEL_TYPES)),
            *("--num_gpus_per_server", ":".join(str(servers[t]) for t in GAVEL_TYPES)),
            *("--seed", "0", "--solver", "ECOS", "--time_per_iteration", str(round_s)),
        ]
    else:
        types = json.dumps(gavel_types(config))
        args = {
            "scheduler_dir": str(scheduler_dir),
            "replace": None if variant == "mapped" else [HARDCODED, f"worker_types = {types}"],
            "trace": str(trace),
            "throughputs": str(tput),
            "policy": policy,
            "solver": "ECOS",
            "seed": 0,
            "round_s": round_s,
            "cluster": gpus,
            "per_server": servers,
        }
        command = [python, "-c", DRIVER, json.dumps(args)]
    start = time.perf_counter()
    with stdout.open("w") as out, stderr.open("w") as err:
        # Gavel logs every round at DEBUG to stderr: it goes to a file, read back only on failure.
        try:
            done = subprocess.run(
                command, cwd=scheduler_dir, stdout=out, stderr=err, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = stderr.read_bytes()[-3000:].decode(errors="replace")
        raise SystemExit(f"Gavel failed ({variant}, {policy}), rc {done.returncode}:\n{tail}")
    jcts = [
        float(m.group(1)) for m in re.finditer(r"^Job \d+: ([0-9.]+)$", stdout.read_text(), re.M)
    ]
    return jcts, seconds


def ours(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Our simulator's mean JCT (h) per policy on the same slice."""
    command = [
        sys.executable,
        *("-m", "graph.cli", "simulate", "--trace", args.trace, "--workload", "pure"),
        *("--vc", args.vc, "--jobs", str(args.jobs), "--fleet", args.fleet),
        *("--out", str(out), "--policies", OURS_POLICIES, "--json"),
    ]
    if args.models:
        command += ["--models", args.models]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    means: dict[str, float] = {}
    for name, result in report["policies"].items():
        means[name] = float(result["jct_hours"]["mean"])
    return means


def ours_command(args: argparse.Namespace) -> str:
    models = f" --models {args.models}" if args.models else ""
    return (
        f".venv/bin/python -m graph.cli simulate --trace {args.trace} --workload pure "
        f"--vc {args.vc} --jobs {args.jobs} --fleet {args.fleet}{models} --out /tmp/x "
        f"--policies {OURS_POLICIES}"
    )


def load(args: argparse.Namespace) -> tuple[FleetConfig, list[SimJob]]:
    name, text = fleet_source(args.fleet)
    if args.models:
        name, text = with_models(name, text, args.models)
    config = parse_fleet(text, source=f"fleet file {name}")
    trace = read_trace(args.trace, PHILLY)
    chosen = select(trace, PHILLY, args.vc, args.jobs)
    settings = replace(WorkloadSettings(), pure=True, models=args.models is not None)
    return config, synthesize(chosen, config, settings).jobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gavel", required=True, help="a checkout of Gavel (its scheduler/ inside)")
    p.add_argument("--gavel-python", required=True, help="the python of Gavel's environment")
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--fleet", default="benchmarks/fleet_128.toml")
    p.add_argument("--models", default=None, help="per-model speeds (gavel_speeds.toml)")
    p.add_argument("--vc", default="6c71a0")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--policies", default="max_min_fairness_perf")
    p.add_argument("--round-s", type=int, default=360, help="Gavel's round (its default)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per Gavel run")
    p.add_argument("--out", default=None, help="keep Gavel's inputs and output here")
    p.add_argument("--ours", action="store_true", help="run our simulator on the slice too")
    p.add_argument(
        "--check-driver",
        action="store_true",
        help="run `mapped` through our driver too: its JCTs must be Gavel's driver's, bit for bit",
    )
    args = p.parse_args()
    if args.jobs < 1 or args.round_s < 1 or args.timeout <= 0:
        raise SystemExit("--jobs and --round-s must be at least 1 and --timeout above 0")
    if not (Path(args.gavel) / "scheduler" / "scheduler.py").is_file():
        raise SystemExit(f"--gavel {args.gavel}: no scheduler/scheduler.py (a Gavel checkout?)")
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    config, jobs = load(args)
    if "mapped" in variants and set(gavel_types(config)) != {
        t for ts in MAPPED.values() for t in ts
    }:
        raise SystemExit(f"the mapping {MAPPED} is for the five types of fleet_128.toml")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gavel-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "gavel.trace").write_text("\n".join(trace_lines(jobs)) + "\n")
    for variant in variants:
        table = throughputs(jobs, config, variant)
        check_keys(table, jobs)
        (work / f"throughputs-{variant}.json").write_text(json.dumps(table, indent=1))
    gpus = sum(config.gpus_of_type(t) for t in gavel_types(config))
    print(
        f"{len(jobs)} jobs (vc {args.vc}, pure work), {gpus} GPUs "
        f"({', '.join(f'{config.gpus_of_type(t)} {t}' for t in gavel_types(config))}), "
        f"speeds: {args.models or 'the catalog type averages'}, Gavel's rounds {args.round_s} s; "
        f"its files in {work}"
    )

    def run(
        variant: str, policy: str, our_driver: bool = False
    ) -> tuple[list[float] | None, float]:
        return run_gavel(
            Path(args.gavel),
            args.gavel_python,
            variant,
            policy,
            config,
            work,
            args.timeout,
            args.round_s,
            our_driver,
        )

    results = []
    for variant in variants:
        for policy in [q for q in args.policies.split(",") if q]:
            if (variant, policy) in SKIP:
                print(f"gavel {variant:<11} {policy:<24} not run: {SKIP[variant, policy]}")
                continue
            jcts, seconds = run(variant, policy)
            if jcts is None or len(jcts) < len(jobs):
                done = "no" if jcts is None else str(len(jcts))
                print(f"gavel {variant:<11} {policy:<24} {done} jobs done in {seconds:.0f} s")
                continue
            hours = [j / 3600.0 for j in jcts]
            p50, p99 = (float(v) for v in np.percentile(np.asarray(hours), [50, 99]))
            r = Result(variant, policy, len(hours), statistics.mean(hours), p50, p99, seconds)
            results.append(r)
            print(
                f"gavel {r.variant:<11} {r.policy:<24} jobs={r.jobs} "
                f"jct_mean_h={r.mean_h:.2f} p50={r.p50_h:.2f} p99={r.p99_h:.2f} "
                f"wall_s={r.seconds:.0f}",
                flush=True,
            )
            if variant == "mapped" and args.check_driver:
                again, _ = run(variant, policy, our_driver=True)
                same = "the same" if again == jcts else "DIFFERENT"
                print(f"      {policy} through our driver, nothing replaced: {same} JCTs")
    (work / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    if args.ours:
        for name, mean in ours(args, work / "ours").items():
            print(f"ours  {name:<36} jct_mean_h={mean:.2f}")
    else:
        print(f"ours: {ours_command(args)}")


if __name__ == "__main__":
    main()

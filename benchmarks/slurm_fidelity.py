"""Is the `slurm-like` baseline Slurm? One slice of the Philly trace replayed on a real Slurm
22.05 and through the simulator's slurm-like (sim/baselines.py), the same jobs on the same
fleet; how far their start orders (Kendall's tau) and queueing delays agree.

    .venv/bin/python benchmarks/slurm_fidelity.py [--trace ../shared/traces/philly.csv]
        [--skip 22500] [--jobs 300] [--scale 30] [--shape nodes|pooled] [--seed 0]
        [--fleet benchmarks/slurm_fidelity_fleet.toml] [--out DIR]

As root, with Debian's `slurmctld slurmd slurm-client munge`: the cluster is a private one
(tests/slurmserver.py) whose nodes mirror the fleet's, started and stopped here.

The same jobs on both sides:

- The slice: `--jobs` trace jobs after the first `--skip` (submission order), made into
  requests by sim.workload's seeded rule with `under_share` 0, so no request asks for less
  than its work needs: Slurm kills a job at its limit, slurm-like asks again, and that
  difference is not the one measured here.
- Time runs `--scale` times faster on Slurm: a job holds its GPUs for its simulated hold time
  (sim.lifecycle.timeline on the type it got, idle tail included) / scale, as `sleep` in its
  batch script, which reads the type from the node it runs on. Slurm keeps time limits in
  whole minutes, so each walltime is rounded up to whole minutes of real time, and the
  simulator gets the rounded walltime; likewise PriorityMaxAge and PriorityDecayHalfLife.
- The simulator gets the submit times Slurm recorded (whole seconds, times the scale), not
  the driver's intended ones, so both sides see the same arrivals.
- Slurm's settings are those slurm-like's docstring names: multifactor priority (weights
  from the fleet's [scheduler], classic fair share 2^(-U/S), age over age_max_hours), EASY
  backfill per partition (`bf_job_part_count_reserve=1`: one reservation, for the
  highest-priority job that cannot start), partitions as slurm-like joins types
  (sim.baselines), node weights in pool order (the first allowed type with room is used
  first). Slurm 22.05 without slurmdbd, as on these machines, ignores the age and fair-share
  weights (slurmctld logs "PriorityWeightAge can only be used with SlurmDBD, ignoring", and
  every job's priority is 1: first come, first served by job id), so the simulator is
  compared with fair share off (its age factor then keeps the same order) and, for what that
  leaves out, as shipped.
- Shapes: `nodes` mirrors the fleet's nodes (a job of up to a node's GPUs needs them on one
  node, as `--gres` asks); `pooled` gives each type one node with all its GPUs, which is how
  slurm-like counts GPUs (per type, wherever they are).

Resolution: Slurm's times are whole seconds (one second is `scale` trace seconds), its
backfill runs every second (bf_interval=1, bf_resolution=1), and a job's launch and
completion add a fraction of a second that the simulator does not have (measured and
reported as the hold overhead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.config import FleetConfig, SchedulerSettings, load_fleet
from fleet.errors import InvalidInput
from fleet.trace import read_trace
from sim.baselines import _partitions, run_baseline
from sim.lifecycle import timeline
from sim.workload import SimJob, Workload, WorkloadSettings, candidate_types, synthesize
from tests.slurmserver import Layout, SlurmServer, installed, scratch_root

HERE = Path(__file__).resolve().parent
TRACE = HERE.parents[1] / "shared" / "traces" / "philly.csv"
FLEET = HERE / "slurm_fidelity_fleet.toml"
SHAPES = ("nodes", "pooled")
NAME = "fidelity-"  # Slurm job name prefix; the rest is the simulated job's id


# ---- the cluster that mirrors the fleet --------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """A Slurm shape for a fleet: its nodes' GPUs, which type each node is, which partition
    each type is in, and the slurm.conf layout."""

    nodes: dict[str, list[tuple[str, int]]]
    node_type: dict[str, str]
    partition: dict[str, str]
    layout: Layout

    def nodes_of(self, gpu_type: str) -> list[str]:
        return [n for n, t in self.node_type.items() if t == gpu_type]

    def node_size(self, gpu_type: str) -> int:
        return min(self.nodes[n][0][1] for n in self.nodes_of(gpu_type))


def gres_name(gpu_type: str) -> str:
    return gpu_type.lower()


def pool_weights(config: FleetConfig) -> dict[str, int]:
    """Each type's Slurm node weight: 1 + its place in the pools that list it. Slurm fills the
    lightest nodes first, as slurm-like starts a request on its pool's first type with room."""
    out: dict[str, int] = {}
    for pool in config.pools.values():
        for i, t in enumerate(pool):
            out[t] = min(out.get(t, i + 1), i + 1)
    return out


def partition_names(config: FleetConfig) -> dict[str, str]:
    """Each held type's Slurm partition: slurm-like's (sim.baselines), named by its types."""
    number = _partitions(config)
    held = [t for t in config.catalog if config.gpus_of_type(t)]
    names = {p: "-".join(gres_name(t) for t in held if number[t] == p) for p in number.values()}
    return {t: names[number[t]] for t in held}


def mirror(config: FleetConfig, shape: str, settings: Mapping[str, str]) -> Cluster:
    """The fleet as Slurm nodes (one per fleet node, or one per type with all its GPUs),
    weighted by the type's place in its pool, one partition per slurm-like partition."""
    if shape == "nodes":
        members = [(n.name, n.gpu_type, n.gpus) for n in config.nodes]
    else:
        held = [t for t in config.catalog if config.gpus_of_type(t)]
        members = [(gres_name(t), t, config.gpus_of_type(t)) for t in held]
    weight = pool_weights(config)
    partition = partition_names(config)
    partitions: dict[str, list[str]] = {}
    for name, gpu_type, _ in members:
        partitions.setdefault(partition[gpu_type], []).append(name)
    keys = {name: f"Weight={weight.get(t, 1)} Features={gres_name(t)}" for name, t, _ in members}
    return Cluster(
        nodes={name: [(gres_name(t), gpus)] for name, t, gpus in members},
        node_type={name: t for name, t, _ in members},
        partition=partition,
        layout=Layout(partitions=partitions, node_keys=keys, settings=dict(settings)),
    )


# ---- time on Slurm ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """`scale` trace seconds pass in one second on Slurm."""

    scale: float

    def minutes(self, trace_hours: float) -> int:
        """Trace hours as Slurm's whole minutes of real time, rounded up, at least one."""
        return max(1, math.ceil(trace_hours * 60.0 / self.scale - 1e-9))

    def hours(self, minutes: int) -> float:
        """Slurm's real minutes as trace hours."""
        return minutes * self.scale / 60.0


def slurm_settings(
    config: FleetConfig, timing: Timing, longest: int
) -> tuple[dict[str, str], SchedulerSettings]:
    """slurm.conf's priority and scheduler settings for slurm-like's model, and the fleet's
    scheduler settings with the values Slurm rounds to whole minutes (`longest`: the longest
    time limit, in minutes, that backfill must plan over)."""
    s = config.scheduler
    age, half = timing.minutes(s.age_max_hours), timing.minutes(s.half_life_hours)
    window = min(43200, max(1440, longest + 1))  # Slurm's bf_window limit: 30 days
    conf = {
        "PriorityType": "priority/multifactor",
        "PriorityFlags": "NO_FAIR_TREE",  # the classic 2^(-U/S) that fleet.scheduler computes
        "PriorityWeightFairshare": str(round(s.weight_fairshare)),
        "PriorityWeightAge": str(round(s.weight_age)),
        "PriorityWeightJobSize": "0",
        "PriorityWeightPartition": "0",
        "PriorityWeightQOS": "0",
        "PriorityMaxAge": str(age),
        "PriorityDecayHalfLife": str(half),
        "PriorityCalcPeriod": "1",
        "SchedulerParameters": (
            "bf_interval=1,bf_resolution=1,bf_job_part_count_reserve=1,bf_continue,"
            f"bf_max_job_test=1000,bf_window={window},sched_interval=2"
        ),
        "MinJobAge": "3600",  # finished jobs stay in squeue --json for the read-out
    }
    update = {"age_max_hours": timing.hours(age), "half_life_hours": timing.hours(half)}
    return conf, s.model_copy(update=update)


# ---- the jobs as Slurm submissions -------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    job: int
    at: float  # real seconds after the slice's first submission
    limit: int  # Slurm's --time, whole real minutes
    hold: dict[str, float]  # real seconds the job holds its GPUs, by the type it gets
    args: tuple[str, ...]


def allowed(job: SimJob, config: FleetConfig) -> tuple[str, ...]:
    """The types slurm-like may start the job on (sim.baselines: those with room for it)."""
    return tuple(t for t in candidate_types(job, config) if config.gpus_of_type(t) >= job.count)


def hold_seconds(job: SimJob, gpu_type: str, config: FleetConfig) -> float:
    """Trace seconds the simulator holds the job's GPUs on `gpu_type` (work, pauses and idle
    tail): its timeline; no job of the slice outlives its walltime (under_share 0)."""
    return timeline(job, gpu_type, 0.0, config)[-1].end


def submission(
    job: SimJob, t0: float, config: FleetConfig, cluster: Cluster, timing: Timing
) -> Submission:
    """sbatch's arguments for one job: its partition, GPUs (`--nodes` where they exceed a
    node, a constraint where the partition holds types the job may not use), time limit, and
    a batch script that sleeps the hold time of the type of the node it runs on."""
    types = allowed(job, config)
    size = min(cluster.node_size(t) for t in types)
    nodes = math.ceil(job.count / size)
    if job.count % nodes:
        raise InvalidInput(
            f"job {job.id}: {job.count} GPUs do not split evenly over nodes of {size}"
        )
    per_node = job.count // nodes
    gres = f"gpu:{gres_name(job.named_type)}:{per_node}" if job.named_type else f"gpu:{per_node}"
    partition = cluster.partition[types[0]]
    every = [t for t, p in cluster.partition.items() if p == partition]
    limit = timing.minutes(job.requested_hours)
    hold = {t: hold_seconds(job, t, config) / timing.scale for t in types}
    cases = " ".join(f"{'|'.join(cluster.nodes_of(t))}) exec sleep {hold[t]:.3f};;" for t in types)
    args = [
        "--parsable",
        "--output=/dev/null",
        f"--job-name={NAME}{job.id}",
        f"--partition={partition}",
        f"--gres={gres}",
        f"--time={limit}",
        f"--wrap=case $SLURMD_NODENAME in {cases} esac",
    ]
    if nodes > 1:
        args.append(f"--nodes={nodes}")
    if not job.named_type and (nodes > 1 or set(types) != set(every)):
        args.append(f"--constraint=[{'|'.join(gres_name(t) for t in types)}]")
    return Submission(job.id, (job.submit - t0) / timing.scale, limit, hold, tuple(args))


# ---- the replay on Slurm ----------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """One job's start, in trace seconds after the slice's first submission."""

    submit: float
    start: float
    gpu_type: str

    @property
    def wait(self) -> float:
        return self.start - self.submit


def squeue(env: Mapping[str, str]) -> list[dict[str, Any]]:
    done = subprocess.run(["squeue", "--json"], env=env, capture_output=True, text=True, check=True)
    jobs: list[dict[str, Any]] = json.loads(done.stdout)["jobs"]
    return [j for j in jobs if str(j["name"]).startswith(NAME)]


def first_node(hostlist: str) -> str:
    """The first host of a Slurm host list ("a100-[0-1]" -> "a100-0")."""
    head, bracket, rest = hostlist.partition("[")
    if not bracket:
        return hostlist.split(",")[0]
    return head + rest.split(",")[0].split("-")[0].rstrip("]")


@dataclass
class Replay:
    """What Slurm did: each job's squeue record and the pending jobs' priorities seen."""

    jobs: dict[int, dict[str, Any]]
    priorities: list[int]
    seconds: float


def replay(
    plans: Sequence[Submission],
    env: Mapping[str, str],
    timeout: float,
    log: Callable[[str], None],
    poll: float = 3.0,
) -> Replay:
    """Submit each job at its time on the real clock, then wait until every one has started
    (squeue --json); pending jobs' priorities are sampled every `poll` seconds."""
    began = last = time.monotonic()
    priorities: list[int] = []

    def sample() -> list[dict[str, Any]]:
        jobs = squeue(env)
        priorities.extend(int(j["priority"]) for j in jobs if j["job_state"] == "PENDING")
        return jobs

    for i, plan in enumerate(plans):
        delay = began + plan.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        done = subprocess.run(["sbatch", *plan.args], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"sbatch refused job {plan.job}: {done.stderr.strip()}")
        if time.monotonic() - last >= poll:
            last = time.monotonic()
            pending = sum(j["job_state"] == "PENDING" for j in sample())
            took = time.monotonic() - began
            log(f"{took:6.0f} s: submitted {i + 1}/{len(plans)}, {pending} pending")
    deadline = time.monotonic() + timeout
    while True:
        jobs = sample()
        pending = sum(j["job_state"] == "PENDING" for j in jobs)
        if not pending and len(jobs) == len(plans):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{pending} jobs still pending {timeout:g} s after the last submission"
            )
        log(f"{time.monotonic() - began:6.0f} s: all submitted, {pending} pending")
        time.sleep(poll)
    seconds = time.monotonic() - began
    return Replay({int(str(j["name"])[len(NAME) :]): j for j in jobs}, priorities, seconds)


def ignored_settings(server: SlurmServer) -> list[str]:
    """What slurmctld's log says it ignored of the configuration (without slurmdbd: the age
    and fair-share weights)."""
    log = (server.root / "log" / "slurmctld.log").read_text(errors="replace")
    return sorted({line.split("] ", 1)[-1] for line in log.splitlines() if "ignoring" in line})


def slurm_starts(done: Replay, cluster: Cluster, timing: Timing) -> dict[int, Start]:
    first = min(int(j["submit_time"]) for j in done.jobs.values())
    return {
        job: Start(
            (int(j["submit_time"]) - first) * timing.scale,
            (int(j["start_time"]) - first) * timing.scale,
            cluster.node_type[first_node(str(j["nodes"]))],
        )
        for job, j in done.jobs.items()
    }


def hold_overhead(done: Replay, plans: Mapping[int, Submission], cluster: Cluster) -> list[float]:
    """Real seconds each completed job held its nodes beyond its sleep (launch, completion;
    Slurm's whole seconds make each one +-1)."""
    out = []
    for job, j in done.jobs.items():
        if j["job_state"] == "COMPLETED":
            held = int(j["end_time"]) - int(j["start_time"])
            out.append(held - plans[job].hold[cluster.node_type[first_node(str(j["nodes"]))]])
    return out


def start_latency(done: Replay) -> list[float]:
    """Real seconds from the last end in a job's partition to its start, for each job that
    waited (started over a second after its submission, after some job of its partition
    ended): how long Slurm takes to give freed GPUs to the next job, which the simulator does
    at once."""
    ends: dict[str, list[int]] = {}
    for j in done.jobs.values():
        if j["job_state"] == "COMPLETED":
            ends.setdefault(str(j["partition"]), []).append(int(j["end_time"]))
    out = []
    for j in done.jobs.values():
        start = int(j["start_time"])
        before = [e for e in ends.get(str(j["partition"]), []) if e <= start]
        if start - int(j["submit_time"]) > 1 and before:
            out.append(float(start - max(before)))
    return out


# ---- the same jobs in the simulator ------------------------------------------------------------


def simulated(
    workload: Workload,
    starts: Mapping[int, Start],
    limits: Mapping[int, int],
    config: FleetConfig,
    timing: Timing,
) -> tuple[dict[int, Start], int]:
    """slurm-like on the jobs as Slurm saw them (its submit times, its whole-minute walltimes),
    and the number of attempts it killed (none expected)."""
    jobs = [
        replace(j, submit=starts[j.id].submit, requested_hours=timing.hours(limits[j.id]))
        for j in workload.jobs
        if j.id in starts
    ]
    attempts = run_baseline("slurm-like", Workload(jobs, workload.budgets), config)
    kills = sum(a.outcome == "killed" for a in attempts)
    first = {a.job: a for a in attempts if a.attempt == 1}
    out = {}
    for job in jobs:
        a = first[job.id]
        assert a.start is not None and a.gpu_type is not None, f"job {job.id} never started"
        out[job.id] = Start(job.submit, a.start, a.gpu_type)
    return out, kills


def configured(config: FleetConfig, scheduler: SchedulerSettings, fair_share: bool) -> FleetConfig:
    if not fair_share:
        scheduler = scheduler.model_copy(update={"weight_fairshare": 0.0})
    return config.model_copy(update={"scheduler": scheduler})


# ---- agreement --------------------------------------------------------------------------------


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either order counted as neither agreeing nor not); nan
    where one side is all ties."""
    agree = disagree = tied_x = tied_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            if dx * dy > 0:
                agree += 1
            elif dx * dy < 0:
                disagree += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (agree - disagree) / denominator if denominator else math.nan


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx and sy else math.nan


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile, linear between order statistics."""
    v = sorted(values)
    at = q * (len(v) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (at - lo)


def waits(starts: Mapping[int, Start], noise: float) -> dict[str, float]:
    """Queueing delays in trace minutes; `waited`: the share of jobs that waited over `noise`
    trace seconds."""
    w = [s.wait for s in starts.values()]
    return {
        "mean_min": sum(w) / len(w) / 60,
        "p50_min": quantile(w, 0.5) / 60,
        "p90_min": quantile(w, 0.9) / 60,
        "p99_min": quantile(w, 0.99) / 60,
        "max_min": max(w) / 60,
        "waited": sum(x > noise for x in w) / len(w),
    }


def agreement(a: Mapping[int, Start], b: Mapping[int, Start], noise: float) -> dict[str, float]:
    """How far two runs of the same jobs agree: Kendall's tau of their start times (all jobs,
    and the jobs that waited over `noise` trace seconds on either side), the correlation and
    mean absolute difference of each job's queueing delay, and the share of jobs on the same
    GPU type."""
    ids = sorted(a.keys() & b.keys())
    waited = [i for i in ids if a[i].wait > noise or b[i].wait > noise]
    diff = [abs(a[i].wait - b[i].wait) for i in ids]
    return {
        "jobs": len(ids),
        "tau_start": kendall_tau([a[i].start for i in ids], [b[i].start for i in ids]),
        "jobs_waited": len(waited),
        "tau_start_waited": kendall_tau([a[i].start for i in waited], [b[i].start for i in waited]),
        "wait_r": pearson([a[i].wait for i in ids], [b[i].wait for i in ids]),
        "wait_mean_abs_diff_min": sum(diff) / len(diff) / 60,
        "wait_p50_abs_diff_min": quantile(diff, 0.5) / 60,
        "same_type": sum(a[i].gpu_type == b[i].gpu_type for i in ids) / len(ids),
    }


# ---- the benchmark ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    trace: Path = TRACE
    skip: int = 22500  # 300 jobs of 8 projects in 2.9 h that queue for hours on 60 GPUs
    jobs: int = 300
    scale: float = 30.0  # the default slice then takes about 7.5 minutes on Slurm
    shape: str = "nodes"
    seed: int = 0
    fleet: Path = FLEET
    timeout: float = 900.0  # seconds after the last submission for every job to start


def workload_slice(opts: Options, config: FleetConfig) -> tuple[Workload, int]:
    """The slice's requests (no under-asking), less those no type of the fleet can hold
    (slurm-like refuses them, sbatch too): the workload and how many were left out."""
    trace = read_trace(opts.trace)[opts.skip : opts.skip + opts.jobs]
    if not trace:
        raise InvalidInput(f"the trace has no jobs after the first {opts.skip:,}")
    settings = WorkloadSettings(seed=opts.seed, under_share=0.0)
    workload = synthesize(trace, config, settings)
    kept = [j for j in workload.jobs if allowed(j, config)]
    if not kept:
        raise InvalidInput(f"no job of the slice fits the fleet ({len(trace)} need more GPUs)")
    return Workload(kept, workload.budgets), len(workload.jobs) - len(kept)


def run(opts: Options, log: Callable[[str], None]) -> dict[str, Any]:
    """The slice on a Slurm started here and in the simulator; every figure of the report."""
    config = load_fleet(opts.fleet)
    timing = Timing(opts.scale)
    workload, left_out = workload_slice(opts, config)
    limits = {j.id: timing.minutes(j.requested_hours) for j in workload.jobs}
    conf, scheduler = slurm_settings(config, timing, max(limits.values()))
    cluster = mirror(config, opts.shape, conf)
    t0 = min(j.submit for j in workload.jobs)
    plans = {j.id: submission(j, t0, config, cluster, timing) for j in workload.jobs}
    server = SlurmServer(scratch_root(), cluster.nodes, cluster.layout)
    try:
        server.start()
        log(f"Slurm up ({len(cluster.nodes)} nodes); replaying {len(plans)} jobs")
        done = replay(list(plans.values()), server.env, opts.timeout, log)
        ignored = ignored_settings(server)
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
    slurm = slurm_starts(done, cluster, timing)
    sim, killed = simulated(workload, slurm, limits, configured(config, scheduler, False), timing)
    shipped, killed_fs = simulated(
        workload, slurm, limits, configured(config, scheduler, True), timing
    )
    noise = 2 * timing.scale  # two of Slurm's seconds
    overhead = hold_overhead(done, plans, cluster)
    latency = start_latency(done)
    states: dict[str, int] = {}
    for j in done.jobs.values():
        states[j["job_state"]] = states.get(j["job_state"], 0) + 1
    return {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "jobs": len(workload.jobs),
        "left_out": left_out,
        "fleet_gpus": sum(n.gpus for n in config.nodes),
        "slurm_conf": conf,
        "noise_trace_s": noise,
        "slurm": {
            "seconds": done.seconds,
            "states": states,
            "ignored": ignored,
            "pending_priority": [min(done.priorities, default=0), max(done.priorities, default=0)],
            "hold_overhead_s": {
                "mean": sum(overhead) / len(overhead) if overhead else math.nan,
                "p50": quantile(overhead, 0.5) if overhead else math.nan,
            },
            "start_latency_s": {
                "mean": sum(latency) / len(latency) if latency else math.nan,
                "p50": quantile(latency, 0.5) if latency else math.nan,
                "jobs": len(latency),
            },
            "waits": waits(slurm, noise),
        },
        "sim": {"waits": waits(sim, noise), "killed": killed},
        "sim_fair_share": {"waits": waits(shipped, noise), "killed": killed_fs},
        "agreement": agreement(slurm, sim, noise),
        "agreement_fair_share": agreement(slurm, shipped, noise),
        "fair_share_vs_off": agreement(shipped, sim, noise),
        "per_job": [
            {
                "job": i,
                "project": j.project,
                "gpus": j.count,
                "named": j.named_type,
                "limit_min": limits[i],
                "submit": slurm[i].submit,
                "slurm": [slurm[i].start, slurm[i].gpu_type],
                "slurm_state": done.jobs[i]["job_state"],
                "sim": [sim[i].start, sim[i].gpu_type],
                "sim_fair_share": [shipped[i].start, shipped[i].gpu_type],
            }
            for j in workload.jobs
            for i in (j.id,)
        ],
    }


def report(r: Mapping[str, Any]) -> str:
    """The figures as the README and docs quote them."""
    o, s = r["options"], r["slurm"]
    head = "queueing delay, trace minutes   mean    p50    p90    p99    max  waited"
    rows = [("Slurm 22.05", s), ("slurm-like, fair share off", r["sim"])]
    rows.append(("slurm-like as shipped", r["sim_fair_share"]))
    tau_head = (
        "against Slurm                 tau(start)  tau(waited)  r(delay)  |diff| mean"
        "  p50  same type"
    )
    lines = [
        f"slice: {r['jobs']} Philly jobs after the first {o['skip']:,} ({r['left_out']} left out: "
        f"no type holds them); fleet {Path(o['fleet']).name} ({r['fleet_gpus']} GPUs, "
        f"shape {o['shape']}); scale {o['scale']:g} (1 s on Slurm = {o['scale']:g} s of trace)",
        f"Slurm: {s['seconds']:.0f} s wall (machine shared); job states {s['states']}; pending "
        f"priorities {s['pending_priority'][0]}-{s['pending_priority'][1]}; hold overhead mean "
        f"{s['hold_overhead_s']['mean']:.2f} s, p50 {s['hold_overhead_s']['p50']:.2f} s; "
        f"a waiting job started {s['start_latency_s']['mean']:.2f} s (mean; p50 "
        f"{s['start_latency_s']['p50']:.1f} s) after the last end in its partition; "
        f"slurm-like killed {r['sim']['killed']}",
        *(f"slurmctld: {line}" for line in s["ignored"]),
        "",
        head,
    ]
    for name, side in rows:
        w = side["waits"]
        lines.append(
            f"  {name:<28}{w['mean_min']:7.1f}{w['p50_min']:7.1f}{w['p90_min']:7.1f}"
            f"{w['p99_min']:7.1f}{w['max_min']:7.1f}{w['waited']:8.0%}"
        )
    lines += ["", tau_head]
    for name, key in (
        ("slurm-like, fair share off", "agreement"),
        ("slurm-like as shipped", "agreement_fair_share"),
        ("(shipped vs fair share off)", "fair_share_vs_off"),
    ):
        a = r[key]
        lines.append(
            f"  {name:<28}{a['tau_start']:10.3f}{a['tau_start_waited']:9.3f} ({a['jobs_waited']})"
            f"{a['wait_r']:9.3f}{a['wait_mean_abs_diff_min']:11.1f}{a['wait_p50_abs_diff_min']:6.1f}"
            f"{a['same_type']:10.0%}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--skip", type=int, default=Options.skip)
    ap.add_argument("--jobs", type=int, default=Options.jobs)
    ap.add_argument("--scale", type=float, default=Options.scale)
    ap.add_argument("--shape", choices=SHAPES, default=Options.shape)
    ap.add_argument("--seed", type=int, default=Options.seed)
    ap.add_argument("--fleet", type=Path, default=FLEET)
    ap.add_argument("--timeout", type=float, default=Options.timeout)
    ap.add_argument("--out", type=Path, help="write the figures and every job's starts here")
    args = ap.parse_args(argv)
    if args.skip < 0 or args.jobs < 1 or args.scale <= 0:
        print("error: --skip >= 0, --jobs >= 1 and --scale > 0", file=sys.stderr)
        return 2
    if not installed() or os.geteuid() != 0:
        print("error: needs Slurm (slurmctld slurmd slurm-client munge) and root", file=sys.stderr)
        return 2
    opts = Options(**{k: v for k, v in vars(args).items() if k != "out"})
    try:
        result = run(opts, lambda line: print(line, file=sys.stderr, flush=True))
    except InvalidInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "slurm_fidelity.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

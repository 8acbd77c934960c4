"""A Slurm cluster as the fleet: its GPU GRES are the inventory, an allocation is a Slurm job.

- Inventory: the nodes of the partitions gpu-agent places on (`[slurm] partitions` per pool,
  else the cluster's default partition), one GPU per unit of GPU GRES, named
  `slurm:<node>:<gres type>:<k>` (k counts within the type on the node). The type is matched
  against the catalog like an NVML name ("h100" -> H100); a type the catalog does not price is
  listed, never placed. Slurm picks which of a node's GPUs of a type a job gets, so these are
  slots: the ledger counts them per node and type, and records the indices Slurm chose.
- Availability, read at every placement: a drained, down or not-responding node (or one whose
  partitions are all down) leaves placement while it is so; GPUs allocated to jobs gpu-agent
  did not submit are in use outside gpu-agent, on slots the ledger does not hold.
- Holding: when the ledger places an allocation, a holder job named `gpu-agent:<allocation id>`
  (`sbatch --parsable`: the routed pool's partition, the node the ledger chose,
  `--gres=gpu:<type>:<n>`, `--time` the lease in whole minutes rounded up, `--no-requeue`,
  the request's checkpoint notice as `--signal`, gpu-agent's environment not exported) runs
  `sleep` until it ends; the user's work runs in it with `srun --jobid` (and gets the
  signal). A live job of that name is looked for first, so a re-run after a crash never
  submits twice.
- Ends: release scancels it; a moved deadline (a budget cut) updates its TimeLimit; a job
  Slurm ended by itself ends the allocation (`follow`): TIMEOUT as lease-expired, NODE_FAIL as
  unhealthy, anything else (an administrator's scancel, a preemption, a job gone from
  squeue) as cancelled-outside.
- Readings: Slurm reports no per-GPU telemetry, so samples are empty: the monitor enforces the
  lease and the budget, not idleness.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping

from fleet.config import FleetConfig
from fleet.errors import ConfigError
from fleet.fleet_backend import Ended, Hold, SchedulerJob
from fleet.models import GPUInfo, GPUSample, Purpose, ReleaseReason, utc
from fleet.monitoring import OUTSIDE
from fleet.nvml.backend import gpu_type_of
from fleet.slurm.cluster import Job, Node, Partition, Slurm, SlurmError

PREFIX = "gpu-agent:"
HOLD_COMMAND = "exec sleep infinity"  # what the holder job runs until it is ended
UNTYPED = "gpu"  # the slot name of GPUs whose GRES has no type
POLL_S = 0.2
# How long one `squeue --json` answers every question of this process (it lists every job the
# controller holds, ~6 KB each): monitor ticks and placements within it share one call. What
# gpu-agent itself changes (a submission, a cancel, a time limit) is read afresh.
JOBS_FRESH_S = 1.0
# A checkpoint notice as --signal: Slurm counts its time from the job's end, which lies up to a
# minute past the ledger's deadline (time limits are whole minutes), and sends it up to 60 s
# early (its documented resolution): asking for the notice plus this many seconds lands it
# between the notice and the notice plus two minutes before the ledger's deadline, never later.
SIGNAL_SLACK_S = 60
MAX_SIGNAL_S = 65535  # the largest --signal time sbatch accepts
ENDINGS = {
    "TIMEOUT": ReleaseReason.LEASE_EXPIRED,
    "DEADLINE": ReleaseReason.LEASE_EXPIRED,
    "NODE_FAIL": ReleaseReason.UNHEALTHY,
    "BOOT_FAIL": ReleaseReason.UNHEALTHY,
}
log = logging.getLogger(__name__)


def gpu_id(node: str, kind: str, k: int) -> str:
    return f"slurm:{node}:{kind}:{k}"


def slot_of(gpu: str) -> tuple[str, str]:
    """(node, GRES type) of a Slurm GPU id."""
    _, node, kind, _ = gpu.split(":")
    return node, kind


def minutes(seconds: float) -> int:
    """A lease as Slurm's time limit: whole minutes, rounded up, at least one."""
    return max(1, math.ceil(seconds / 60.0 - 1e-9))


def ranges(found: tuple[int, ...]) -> str:
    """(4, 5, 7) -> "4-5,7", as Slurm writes indices."""
    out: list[str] = []
    for i in sorted(found):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def signal_arg(hold: Hold) -> list[str]:
    """The hold's checkpoint notice as sbatch's --signal (sent to the job's steps: the work
    `srun --jobid` runs, not the holder's sleep); none without one."""
    if hold.notice_seconds is None:
        return []
    at = min(MAX_SIGNAL_S, math.ceil(hold.notice_seconds) + SIGNAL_SLACK_S)
    return [f"--signal={hold.notice_signal}@{at}"]


def _held(job: Job, start: float) -> SchedulerJob:
    """A running job as the ledger records it: its id, node, GPU indices and start."""
    return SchedulerJob(
        job.job_id, job.nodes, ranges(job.gpus[0].indices) if job.gpus else "", start
    )


class SlurmFleet:
    name = "slurm"
    hardware = True
    monitoring = "leases and budgets only (Slurm reports no per-GPU utilisation)"

    def __init__(self, config: FleetConfig, slurm: Slurm | None = None) -> None:
        if config.clock.time_scale != 1:
            raise ConfigError(
                "the Slurm backend runs on the real clock: Slurm's time limits do "
                f"(remove [clock] time_scale = {config.clock.time_scale:g})"
            )
        self._config = config
        self._settings = config.slurm
        self.slurm = slurm or Slurm(config.slurm.command_timeout_seconds)
        self.problem: str | None = None  # Slurm did not answer at start-up: nothing to place
        self._inventory: list[GPUInfo] = []
        self.partitions: dict[Purpose, str] = {}
        self._lock = threading.Lock()
        self._jobs_read: tuple[float, list[Job]] | None = None  # (monotonic time, jobs)
        try:
            found = self.slurm.partitions()
            nodes = self.slurm.nodes()
        except SlurmError as exc:
            self.problem = str(exc)
            return
        self.partitions = self._partitions(found)
        wanted = set(self.partitions.values())
        self._inventory = self._discover([n for n in nodes if wanted & set(n.partitions)])

    def _partitions(self, found: dict[str, Partition]) -> dict[Purpose, str]:
        """Each pool's partition: the one the fleet file names, else the default one."""
        default = next((p.name for p in found.values() if p.default), None)
        out = {}
        for purpose in Purpose:
            name = self._settings.partitions.get(purpose, default)
            if name is None:
                raise ConfigError(
                    "the Slurm cluster has no default partition: name one for "
                    f"{purpose.value} in [slurm] partitions"
                )
            if name not in found:
                raise ConfigError(
                    f"[slurm] partitions.{purpose.value}: the Slurm cluster has no partition "
                    f"{name!r} (it has {', '.join(sorted(found)) or 'none'})"
                )
            out[purpose] = name
        return out

    def _discover(self, nodes: list[Node]) -> list[GPUInfo]:
        out = []
        for node in sorted(nodes, key=lambda n: n.name):
            kinds = [(g.kind or UNTYPED, g.count) for g in node.gpus]
            types = [gpu_type_of(kind, self._config.catalog) for kind, _ in kinds]
            mixed = len(set(types)) > 1
            for (kind, count), gpu_type in zip(kinds, types, strict=True):
                spec = self._config.catalog.get(gpu_type)
                out += [
                    GPUInfo(
                        uuid=gpu_id(node.name, kind, k),
                        gpu_type=gpu_type,
                        node=f"{node.name}/{gpu_type}" if mixed else node.name,
                        index=k,
                        memory_gb=spec.memory_gb if spec else 0.0,
                        model_name=f"gpu:{kind}",
                    )
                    for k in range(count)
                ]
        return out

    def inventory(self) -> list[GPUInfo]:
        return list(self._inventory)

    # ---- readings: none ----------------------------------------------------------------------

    def sample(self, gpu_ids: list[str], now: float, holders: Mapping[str, str]) -> list[GPUSample]:
        return [GPUSample(gpu_id=g, at=utc(now)) for g in gpu_ids]

    def unhealthy(self) -> dict[str, str]:
        """None for good: a drained or down node comes back when Slurm says so (`unavailable`),
        not when an administrator clears it in gpu-agent."""
        return {}

    def throttle(self, gpu_id: str) -> str:
        return "nothing done (Slurm reports no temperatures)"

    def steady_until(self, gpu_ids: list[str], at: float) -> float:
        return at

    def reset(self, gpu_ids: list[str]) -> None:
        """Nothing per GPU: the job goes with `cancel`."""

    # ---- what Slurm keeps from placement -----------------------------------------------------

    def unavailable(self, held: Mapping[str, str]) -> dict[str, str]:
        try:
            nodes = {n.name: n for n in self.slurm.nodes()}
            jobs = self._jobs()
            partitions = self.slurm.partitions()
        except SlurmError as exc:  # nothing is placed while Slurm does not answer
            return {g.uuid: str(exc) for g in self._inventory}
        ours = set(held.values())
        mine: dict[tuple[str, str], int] = {}
        for j in jobs:
            if j.live and j.name.startswith(PREFIX) and j.name[len(PREFIX) :] in ours:
                for gres in j.gpus:
                    key = (j.nodes, gres.kind or UNTYPED)
                    mine[key] = mine.get(key, 0) + gres.count
        out: dict[str, str] = {}
        slots: dict[tuple[str, str], list[str]] = {}
        for g in self._inventory:
            slots.setdefault(slot_of(g.uuid), []).append(g.uuid)
        for (name, kind), ids in slots.items():
            node = nodes.get(name)
            why = f"node {name} is gone from Slurm" if node is None else node.unusable()
            if why is None and node is not None:
                up = [p for p in node.partitions if p in partitions and partitions[p].up]
                if not set(up) & set(self.partitions.values()):
                    why = f"node {name}'s partitions are down"
            if why is not None:
                out.update(dict.fromkeys(ids, why))
                continue
            assert node is not None
            used = sum(u.count for u in node.used if (u.kind or UNTYPED) == kind)
            outside = max(0, used - mine.get((name, kind), 0))
            free = [g for g in reversed(ids) if g not in held]
            out.update(dict.fromkeys(free[:outside], OUTSIDE))
        return out

    # ---- holder jobs -------------------------------------------------------------------------

    def _jobs(self, fresh: bool = False) -> list[Job]:
        """Every job Slurm lists: read now, or within the last JOBS_FRESH_S."""
        with self._lock:
            read = self._jobs_read
            if fresh or read is None or time.monotonic() - read[0] > JOBS_FRESH_S:
                read = self._jobs_read = (time.monotonic(), self.slurm.jobs())
            return read[1]

    def _changed(self) -> None:
        """gpu-agent changed a job: the next read asks Slurm."""
        with self._lock:
            self._jobs_read = None

    def _named(self, allocation_id: str, fresh: bool = True) -> list[Job]:
        """The allocation's live jobs, oldest first."""
        name = PREFIX + allocation_id
        found = [j for j in self._jobs(fresh) if j.name == name and j.live]
        return sorted(found, key=lambda j: int(j.job_id))

    def submit(self, hold: Hold) -> SchedulerJob | str:
        slots = {slot_of(g) for g in hold.gpu_ids}
        nodes = sorted({node for node, _ in slots})
        if len(nodes) != 1 or len(slots) != 1:
            return (
                f"the placement spans nodes {', '.join(nodes)}: on Slurm an allocation holds "
                "GPUs of one node (ask for as many as one node has)"
            )
        ((node, kind),) = slots
        try:
            named = self._named(hold.allocation_id)
            if not named:
                self._changed()
                self.slurm.submit(self._sbatch(hold, node, kind))
                named = self._named(hold.allocation_id)
            if len(named) > 1:  # two processes submitted at once: the first one stays
                self._changed()
                self.slurm.cancel([j.job_id for j in named[1:]])
            if not named:
                return f"Slurm lists no job {PREFIX}{hold.allocation_id} right after sbatch"
            return self._started(named[0].job_id, hold.start_by)
        except SlurmError as exc:
            return str(exc)

    def _sbatch(self, hold: Hold, node: str, kind: str) -> list[str]:
        count = len(hold.gpu_ids)
        gres = f"gpu:{count}" if kind == UNTYPED else f"gpu:{kind}:{count}"
        return [
            f"--job-name={PREFIX}{hold.allocation_id}",
            f"--partition={self.partitions[hold.purpose]}",
            f"--nodelist={node}",
            "--nodes=1",
            "--ntasks=1",
            f"--gres={gres}",
            f"--time={minutes(hold.deadline - time.time())}",
            "--no-requeue",
            *signal_arg(hold),
            "--export=NONE",
            "--output=/dev/null",
            f"--comment=gpu-agent allocation {hold.allocation_id} of project {hold.project}",
            *self._settings.sbatch_args,
            f"--wrap={HOLD_COMMAND}",
        ]

    def _started(self, job_id: str, start_by: float | None) -> SchedulerJob | str:
        """The job once it runs; cancelled, and why, if it does not start by `start_by` (the
        request's max wait), else within start_timeout_seconds."""
        if start_by is None:
            give_up = time.time() + self._settings.start_timeout_seconds
            within = f"within {self._settings.start_timeout_seconds:g} s"
        else:
            give_up, within = start_by, "within the request's max wait"
        while True:
            job = next((j for j in self._jobs(fresh=True) if j.job_id == job_id), None)
            if job is None or not job.live:
                state = f"{job.state}: {job.reason}" if job else "gone"
                return f"Slurm job {job_id} ended before it started ({state})"
            if job.state == "RUNNING" and job.start is not None:
                return _held(job, job.start)
            if time.time() >= give_up:
                self._changed()
                self.slurm.cancel([job_id])
                return (
                    f"Slurm did not start job {job_id} {within} ({job.state}: {job.reason}); "
                    "cancelled"
                )
            time.sleep(POLL_S)

    def cancel(self, allocation_id: str) -> str | None:
        try:
            named = self._named(allocation_id)
            if named:
                self._changed()
                self.slurm.cancel([j.job_id for j in named])
        except SlurmError as exc:
            log.warning("allocation %s: its Slurm job was not cancelled: %s", allocation_id, exc)
            return str(exc)
        return None

    def found(self, allocation_id: str) -> SchedulerJob | None:
        try:
            named = self._named(allocation_id, fresh=False)
        except SlurmError:
            return None
        running = [(j, j.start) for j in named if j.state == "RUNNING" and j.start is not None]
        return _held(*running[0]) if running else None

    def live(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for j in self._jobs():
            if j.live and j.name.startswith(PREFIX):
                out.setdefault(j.name[len(PREFIX) :], []).append(j.job_id)
        return out

    def follow(self, job: SchedulerJob, deadline: float) -> Ended | None:
        try:
            found = next((j for j in self._jobs() if j.job_id == job.job_id), None)
            if found is None:  # never "gone" on a read older than the job
                found = next((j for j in self._jobs(fresh=True) if j.job_id == job.job_id), None)
        except SlurmError as exc:
            log.warning("Slurm job %s not read: %s", job.job_id, exc)
            return None  # not known to have ended: the next tick asks again
        if found is None:
            return Ended(
                ReleaseReason.CANCELLED_OUTSIDE,
                None,
                f"Slurm job {job.job_id} is gone (squeue no longer lists it, nor how it ended)",
            )
        if found.live:
            if found.state == "RUNNING" and found.start is not None:
                self._limit(found, deadline)
            return None
        said = f" ({found.reason})" if found.reason not in ("", "None") else ""
        return Ended(
            ENDINGS.get(found.state, ReleaseReason.CANCELLED_OUTSIDE),
            found.end,
            f"Slurm job {job.job_id} ended {found.state}{said}",
        )

    def _limit(self, job: Job, deadline: float) -> None:
        """The job's time limit brought to cover the deadline and no more (whole minutes)."""
        assert job.start is not None
        wanted = minutes(deadline - job.start)
        if job.time_limit == wanted:
            return
        try:
            self._changed()
            self.slurm.set_time_limit(job.job_id, wanted)
        except SlurmError as exc:  # raising one needs a Slurm operator; the monitor still ends it
            log.warning("Slurm job %s: time limit not set to %d min: %s", job.job_id, wanted, exc)

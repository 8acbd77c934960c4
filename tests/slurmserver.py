"""A private Slurm 22.05 cluster on loopback for the tests: munged, slurmctld and one slurmd per
node, all on this host, as root.

Everything lives in one folder: munge's own key and socket (`AuthInfo=socket=...`), free
127.0.0.1 ports for slurmctld and each slurmd, the state, spool, pid and log files; nothing in
/etc is read or written, so it never meets a cluster the host may run. Two nodes (one slurmd
each, Debian's build runs several on one host): `gn1` with `Gres=gpu:a100:4,gpu:h100:4` and
`gn2` with `gpu:h100:2`. gres.conf's `File=` entries are character device nodes made with
mknod (major 1, minor 3: /dev/null's numbers; nothing opens them), so Slurm sets
CUDA_VISIBLE_DEVICES in a job's steps; where mknod is refused they are plain files (slurmd
warns, schedules the same, and sets no CUDA_VISIBLE_DEVICES). The nodes claim 16 CPUs each
(`SlurmdParameters=config_overrides`) so that a few holder jobs fit on a 2-core machine.

Fast settings for tests: finished jobs stay listed 30 s (`MinJobAge`), the scheduler runs
every 2 s, a cancelled job's processes get 2 s between SIGTERM and SIGKILL. Needs Debian's
`slurmctld slurmd slurm-client munge`; `.ci/run` installs them.

A `Layout` gives another shape (benchmarks/slurm_fidelity.py mirrors a simulated fleet):
its partitions, more keys on a node's line (Weight, Features) and slurm.conf settings set or
replaced (priority, backfill). A node claims as many CPUs as it has GPUs where that is over 16.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
# node -> [(gres type, count)]
NODES: dict[str, list[tuple[str, int]]] = {
    "gn1": [("a100", 4), ("h100", 4)],
    "gn2": [("h100", 2)],
}
PARTITION = "gpu"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Layout:
    """A cluster other than the tests' default: partitions (name: nodes; none given, one
    partition PARTITION of every node), more `Key=Value` text for a node's line, and
    slurm.conf settings set or replaced (key: value)."""

    partitions: dict[str, list[str]] = field(default_factory=dict)
    node_keys: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)


def installed() -> bool:
    """Whether the daemons and the client commands are on this host."""
    return all(shutil.which(c) for c in (*DAEMONS, "sinfo", "squeue", "sbatch"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SlurmServer:
    def __init__(
        self,
        root: Path,
        nodes: dict[str, list[tuple[str, int]]] | None = None,
        layout: Layout | None = None,
    ) -> None:
        self.root = root
        self.nodes = nodes or NODES
        self.layout = layout or Layout()
        self.conf = root / "slurm.conf"
        self.socket = root / "run" / "munge.sock"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- files ----------------------------------------------------------------------------

    def _write(self) -> None:
        for sub in ("run", "log", "state", "spool", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        gres, nodes = [], []
        for node, kinds in self.nodes.items():
            index = 0  # /dev/nvidiaN per node, N as Slurm indexes the node's GPUs
            for kind, count in kinds:
                files = [self._device(node, index + i) for i in range(count)]
                gres += [f"NodeName={node} Name=gpu Type={kind} File={f}" for f in files]
                index += count
            spec = ",".join(f"gpu:{k}:{n}" for k, n in kinds)
            more = f" {self.layout.node_keys[node]}" if node in self.layout.node_keys else ""
            nodes.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 "
                f"Port={_free_port()} CPUs={max(16, index)} RealMemory=16000 Gres={spec} "
                f"State=UNKNOWN{more}"
            )
        (self.root / "gres.conf").write_text("\n".join(gres) + "\n")
        parts = self.layout.partitions or {PARTITION: list(self.nodes)}
        self.conf.write_text(
            "\n".join(
                [
                    *(f"{k}={v}" for k, v in self._settings().items()),
                    *nodes,
                    *(
                        f"PartitionName={name} Nodes={','.join(members)}"
                        f"{' Default=YES' if i == 0 else ''} MaxTime=INFINITE State=UP"
                        for i, (name, members) in enumerate(parts.items())
                    ),
                    "",
                ]
            )
        )

    def _settings(self) -> dict[str, str]:
        """slurm.conf's settings (all but nodes and partitions), the layout's applied."""
        r = self.root
        lines = [
            "ClusterName=gpuagenttest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MinJobAge=30",
            "KillWait=2",
            "InactiveLimit=0",
            "MessageTimeout=5",
        ]
        base = {key: value for key, _, value in (line.partition("=") for line in lines)}
        return base | self.layout.settings

    def _device(self, node: str, index: int) -> Path:
        path = self.root / "dev" / node / f"nvidia{index}"
        path.parent.mkdir(exist_ok=True)
        try:
            os.mknod(path, 0o600 | 0o020000, os.makedev(1, 3))  # S_IFCHR
        except OSError:
            path.touch()
        return path

    @property
    def char_devices(self) -> bool:
        """gres.conf's files are device nodes (Slurm then sets CUDA_VISIBLE_DEVICES)."""
        return all(stat.S_ISCHR(f.stat().st_mode) for f in (self.root / "dev").glob("*/*"))

    # ---- daemons --------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)

    def _start(self, *args: str) -> None:
        done = self._run(*args)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {(done.stderr or done.stdout).strip()}")

    def start(self) -> dict[str, str]:
        """Start munged, slurmctld and the slurmds; wait until every node is idle. Returns the
        environment the client commands need (SLURM_CONF)."""
        if os.geteuid() != 0:
            raise RuntimeError("the test Slurm cluster runs as root (slurmd runs jobs as users)")
        self._write()
        r = self.root
        self._start(
            "munged",
            f"--socket={self.socket}",
            f"--key-file={r}/munge.key",
            f"--pid-file={r}/run/munged.pid",
            f"--log-file={r}/log/munged.log",
            f"--seed-file={r}/run/munged.seed",
        )
        self._start("slurmctld", "-f", str(self.conf))
        for node in self.nodes:
            self._start("slurmd", "-f", str(self.conf), "-N", node)
        self.wait_idle()
        return {"SLURM_CONF": str(self.conf)}

    def wait_idle(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every node is idle with no flag (registered, responding, not drained)."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            done = self._run("sinfo", "--json")
            if done.returncode == 0:
                data = json.loads(done.stdout)
                states = {n["name"]: (n["state"], n["state_flags"]) for n in data["nodes"]}
                seen = str(states)
                if len(states) == len(self.nodes) and all(
                    s == "idle" and not f for s, f in states.values()
                ):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the Slurm nodes did not come up within {timeout:g} s: {seen}")

    def jobs(self) -> list[dict[str, object]]:
        done = self._run("squeue", "--json")
        jobs: list[dict[str, object]] = json.loads(done.stdout)["jobs"]
        return jobs

    def clear(self, timeout: float = 30) -> None:
        """Cancel every job and wait until none holds anything (their steps have exited)."""
        live = [str(j["job_id"]) for j in self.jobs() if j["job_state"] in LIVE]
        if live:
            self._run("scancel", *live)
        deadline = time.monotonic() + timeout
        while any(j["job_state"] in LIVE for j in self.jobs()):
            if time.monotonic() > deadline:
                raise RuntimeError("Slurm jobs did not end")
            time.sleep(0.2)

    def reset(self) -> None:
        """As started: no job, every node resumed and idle."""
        self.clear()
        self._run("scontrol", "update", f"NodeName={','.join(self.nodes)}", "State=RESUME")
        self.wait_idle()

    def pids(self) -> list[int]:
        """The daemons of this cluster still running (by their pid files)."""
        files = [self.root / "run" / "munged.pid", self.root / "run" / "slurmctld.pid"]
        files += [self.root / "run" / f"slurmd-{n}.pid" for n in self.nodes]
        pids = []
        for f in files:
            try:
                pid = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if _alive(pid):
                pids.append(pid)
        return pids

    def leftovers(self) -> list[int]:
        """Any process whose command line names this cluster's folder (none after `stop`)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(self.root) in cmd and _alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """End every job, then the slurmds, slurmctld and munged (in that order: a slurmd
        stopped first would leave its jobs' steps running)."""
        if self.conf.exists() and self.pids():
            with contextlib.suppress(
                RuntimeError, subprocess.SubprocessError, ValueError, KeyError
            ):
                self.clear()  # the daemons go anyway
        order = [f"slurmd-{n}.pid" for n in self.nodes] + ["slurmctld.pid", "munged.pid"]
        for name in order:
            f = self.root / "run" / name
            try:
                pid = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


LIVE = ("PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING")


def scratch_root() -> Path:
    """A short fresh folder (munge's socket path must fit in 108 bytes)."""
    return Path(f"/tmp/gpu-agent-slurm-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def _main(argv: list[str]) -> int:
    """`python3 tests/slurmserver.py start DIR` prints the SLURM_CONF path; `stop DIR` stops it."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: slurmserver.py start|stop DIR", file=sys.stderr)
        return 2
    server = SlurmServer(Path(argv[1]))
    if argv[0] == "start":
        print(server.start()["SLURM_CONF"])
    else:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

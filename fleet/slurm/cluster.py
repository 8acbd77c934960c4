"""Slurm's commands as gpu-agent calls them, and what they answer, parsed.

Machine formats only: `sinfo --json` (nodes, their GRES and what of it is allocated, states,
partitions), `squeue --json` (jobs), `sbatch --parsable` (the job id), `scontrol update`
and `scancel` (no output to read). Partitions' availability and the default partition come
from `sinfo --format` with fields and a separator of our choosing (22.05's `sinfo --json`
lists nodes only, and `scontrol` has no --json). Facts of 22.05 this relies on:
- `squeue --json` ignores the filtering options and returns every job slurmctld still holds,
  finished ones included for `MinJobAge`: jobs are filtered here.
- With the controller down, `squeue --json` and `sinfo --json` exit 0 and print an empty
  list with `errors`: an error list is a failure, never "no jobs".
- A GRES string is `name[:type]:count[(S:..)|(IDX:..)]`, comma-separated, with commas inside
  the parentheses too ("gpu:h100:3(IDX:4-5,7)").
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleet.errors import GPUAgentError

# Job states in which a job holds (or is about to hold) its resources.
LIVE = frozenset(
    {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING"}
)
# Node flags that keep a node from new jobs (22.05's sinfo --json `state_flags`).
UNUSABLE_FLAGS = frozenset(
    {
        "DRAIN",
        "FAIL",
        "MAINTENANCE",
        "NOT_RESPONDING",
        "POWERED_DOWN",
        "POWERING_DOWN",
        "POWER_DOWN",
        "REBOOT_REQUESTED",
        "REBOOT_ISSUED",
    }
)
USABLE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})


class SlurmError(GPUAgentError):
    """Slurm did not answer, or refused: one line, with what it said."""


@dataclass(frozen=True)
class Gres:
    """GPUs of one type in a GRES string."""

    kind: str | None  # the GRES type ("h100"); None where the GRES is untyped ("gpu:4")
    count: int
    indices: tuple[int, ...] = ()  # which ones (IDX), where Slurm says


@dataclass(frozen=True)
class Node:
    name: str
    state: str
    flags: tuple[str, ...]
    reason: str
    partitions: tuple[str, ...]
    gpus: tuple[Gres, ...]  # configured
    used: tuple[Gres, ...]  # allocated to jobs now

    def unusable(self) -> str | None:
        """Why Slurm starts no new job here (None: it does)."""
        flags = [f for f in self.flags if f in UNUSABLE_FLAGS]
        if self.state in USABLE_STATES and not flags:
            return None
        words = " ".join([self.state, *(f.lower() for f in flags)])
        return f"node {self.name} is {words}" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class Job:
    job_id: str
    name: str
    state: str
    reason: str  # why it waits, where it waits
    nodes: str
    gpus: tuple[Gres, ...]  # what it was given (on its first node); () once it ended
    start: float | None
    end: float | None
    time_limit: int | None  # minutes
    user: str

    @property
    def live(self) -> bool:
        return self.state in LIVE


@dataclass(frozen=True)
class Partition:
    name: str
    up: bool
    default: bool


def split_gres(text: str | None) -> list[str]:
    """Comma-separated entries, commas inside parentheses kept."""
    out, depth, cur = [], 0, ""
    for c in text or "":
        depth += (c == "(") - (c == ")")
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
    out.append(cur)
    return [e.strip() for e in out if e.strip() and e.strip() not in ("(null)", "N/A")]


def indices(text: str) -> tuple[int, ...]:
    """ "4-5,7" -> (4, 5, 7); "N/A" -> ()."""
    found: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            found += range(int(lo), int(hi or lo) + 1)
    return tuple(found)


def parse_gres(text: str | None, name: str = "gpu") -> tuple[Gres, ...]:
    """The GPUs of a GRES string: one Gres per type (other GRES, such as shards, left out)."""
    out = []
    for entry in split_gres(text):
        head, _, extra = entry.partition("(")
        fields = head.split(":")
        if fields[0] != name or len(fields) < 2:
            continue
        kind = fields[1] if len(fields) > 2 else None
        count = fields[-1]
        if not count.isdigit():
            continue
        idx = extra.rstrip(")").split("IDX:", 1)[1] if "IDX:" in extra else ""
        out.append(Gres(kind, int(count), indices(idx)))
    return tuple(out)


def _time(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


class Slurm:
    """Runs Slurm's client commands (on PATH; SLURM_CONF, where set, names the cluster)."""

    def __init__(self, timeout_s: float = 30.0, env: Mapping[str, str] | None = None) -> None:
        self.timeout_s = timeout_s
        self.env = dict(env) if env is not None else None

    def run(self, *args: str) -> str:
        """A command's stdout; SlurmError with its first line of complaint otherwise."""
        try:
            done = subprocess.run(
                args,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                env=self.env,  # None: this process's (SLURM_CONF names the cluster)
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise SlurmError(
                f"Slurm's {args[0]} is not installed here (apt-get install slurm-client)"
            ) from None
        except subprocess.TimeoutExpired:
            raise SlurmError(
                f"Slurm did not answer: {args[0]} took over {self.timeout_s:g} s"
            ) from None
        if done.returncode:
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            said = lines[-1] if lines else f"exit status {done.returncode}"
            raise SlurmError(f"{args[0]}: {said}")
        return done.stdout

    def _json(self, *args: str) -> dict[str, Any]:
        out = self.run(*args)
        try:
            data: dict[str, Any] = json.loads(out)
        except ValueError:
            raise SlurmError(f"{args[0]} --json printed no JSON: {out[:80]!r}") from None
        errors = data.get("errors") or []
        if errors:
            first = errors[0]
            said = first.get("description") or first.get("error") or "an error"
            where = f" ({first['source']})" if first.get("source") else ""
            raise SlurmError(f"Slurm did not answer {args[0]}: {said}{where}")
        return data

    def nodes(self) -> list[Node]:
        return [
            Node(
                name=n["name"],
                state=str(n.get("state", "")).lower(),
                flags=tuple(n.get("state_flags") or ()),
                reason=n.get("reason") or "",
                partitions=tuple(n.get("partitions") or ()),
                gpus=parse_gres(n.get("gres")),
                used=parse_gres(n.get("gres_used")),
            )
            for n in self._json("sinfo", "--json")["nodes"]
        ]

    def partitions(self) -> dict[str, Partition]:
        out: dict[str, Partition] = {}
        for line in self.run("sinfo", "--noheader", "--format=%P|%a").splitlines():
            name, _, avail = line.strip().partition("|")
            if name:
                default = name.endswith("*")
                name = name.rstrip("*")
                out[name] = Partition(name, avail.strip() == "up", default)
        return out

    def jobs(self) -> list[Job]:
        return [
            Job(
                job_id=str(j["job_id"]),
                name=j.get("name") or "",
                state=j.get("job_state") or "",
                reason=j.get("state_reason") or "",
                nodes=j.get("nodes") or "",
                gpus=parse_gres(",".join((j.get("gres_detail") or [])[:1])),
                start=_time(j.get("start_time")),
                end=_time(j.get("end_time")),
                time_limit=j.get("time_limit") if isinstance(j.get("time_limit"), int) else None,
                user=j.get("user_name") or "",
            )
            for j in self._json("squeue", "--json")["jobs"]
        ]

    def submit(self, args: list[str]) -> str:
        """sbatch --parsable: the new job's id ("id" or "id;cluster")."""
        out = self.run("sbatch", "--parsable", *args).strip()
        job_id = out.split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id: {out[:80]!r}")
        return job_id

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            self.run("scancel", *job_ids)

    def set_time_limit(self, job_id: str, minutes: int) -> None:
        self.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")

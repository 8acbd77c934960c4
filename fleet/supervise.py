"""Running a user's command on allocated GPUs and stopping it when the allocation ends.

The command starts in a process group of its own, with CUDA_VISIBLE_DEVICES naming the GPUs by
UUID. Only that group is ever signalled: SIGTERM, a grace period, then SIGKILL (Slurm's
KillWait pattern). The group leader is never reaped before the end (its exit is observed with
waitid(WNOWAIT)), so its PID, which is the group's id, cannot be reused by an unrelated process
while this module may still signal the group.

A command whose `gpu-agent run` died is adopted by the `run --resume` that carries its work on
(Adopted): only the members of its group whose environment names its allocation are signalled,
one PID at a time; nobody can read its exit status any more.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import CannotStart, InvalidInput

POLL_S = 0.05
ALLOCATION_ENV = "GPU_AGENT_ALLOCATION"  # set for the command: the allocation it runs on


GRACE_S = 30.0  # between a command's SIGTERM and its SIGKILL, unless `run --grace` says
RUN_POLL_S = 0.25  # how often `run`, and a caller waiting for it, read the ledger
RELEASE_WAIT_S = 30.0  # how long after its command stopped a release may take to land


def still_running(allocation_id: str) -> str:
    """What a caller's release says when it gave up waiting for the `gpu-agent run` that runs
    a command on the allocation (Services.release_asked): it released, the command may not
    have stopped."""
    return (
        f"the gpu-agent run on {allocation_id} did not stop its command (not within its grace "
        f"and {RELEASE_WAIT_S:.0f} s, or it went quiet or died): the GPUs are released, and "
        "the command may still be running"
    )


@dataclass(frozen=True)
class RunCommand:
    """What a `run` runs, recorded in the ledger (fleet.ledger.runs) so that a
    `run --resume` carries it on after its process died, and a monitor that adopted its
    allocation gives it its notice and its end (fleet.left_running). The environment is not
    recorded (it may hold secrets, and the ledger may be shared): the resuming process
    passes its own."""

    argv: list[str]
    cwd: str
    grace_s: float
    notice_s: float
    notice_signal: str  # a signal's name, SIGUSR1

    @property
    def signal(self) -> signal.Signals:
        return signal.Signals[self.notice_signal]

    @classmethod
    def read(cls, raw: dict[str, object]) -> RunCommand:
        return cls(**raw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Stopped:
    """How the command ended when it was told to."""

    terminated: bool  # SIGTERM was sent
    killed: bool  # SIGKILL was needed after the grace period
    leftover: list[int]  # PIDs of the group still alive afterwards (should be empty)


def group_members(pgid: int, proc: Path = Path("/proc")) -> list[int]:
    """Live processes (not zombies) of a process group, from /proc."""
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def check_startable(argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> None:
    """InvalidInput unless `argv[0]` names an executable file (looked up on env's PATH like
    exec does, a relative path from `cwd`), so that GPUs are never placed for a command that
    cannot start."""
    if not argv:
        raise InvalidInput("no command to run (put it after --)")
    program = argv[0]
    if "/" in program:
        path = os.path.join(cwd or os.getcwd(), program)  # as given where absolute
        if not os.path.isfile(path):
            raise InvalidInput(f"cannot run {program!r}: no such file; nothing was placed")
        if not os.access(path, os.X_OK):
            raise InvalidInput(f"cannot run {program!r}: not executable; nothing was placed")
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise InvalidInput(f"cannot run {program!r}: not found on PATH; nothing was placed")


class Group(ABC):
    """A command's processes, signalled and stopped as one: one started here (Supervised)
    or one a dead `run` left behind (Adopted)."""

    pid: int  # the process group's id (its leader's PID)

    def __init__(self) -> None:
        self._stop_lock = threading.Lock()
        self._stopped: Stopped | None = None  # what the last stop did

    @abstractmethod
    def exited(self) -> bool:
        """Whether the group's leader has exited."""

    @abstractmethod
    def members(self) -> list[int]:
        """The PIDs of the group's processes still alive."""

    @abstractmethod
    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the group's processes."""

    @abstractmethod
    def returncode(self) -> int | None:
        """Its exit status as a shell gives it (128 + signal if killed); None: unknown."""

    def wait_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Poll `done` until it holds or `timeout` seconds pass; whether it held."""
        end = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= end:
                return False
            time.sleep(POLL_S)
        return True

    def _gone(self) -> bool:
        return self.exited() and not [p for p in self.members() if p != self.pid]

    def stop(self, grace_s: float) -> Stopped:
        """SIGTERM the group, wait up to `grace_s`, SIGKILL what is left. One stop at a time:
        a second caller (a release in another thread of `run`) waits for the first and is
        told what it did, and the command gets one SIGTERM, not two (a second SIGTERM is
        "quit now" to many training loops)."""
        with self._stop_lock:
            if self._stopped is not None and self._gone():
                return self._stopped
            terminated = killed = False
            if not self._gone():
                self.signal(signal.SIGTERM)
                terminated = True
                if not self.wait_until(self._gone, grace_s):
                    self.signal(signal.SIGKILL)
                    killed = True
                    self.wait_until(self._gone, 10.0)
            leftover = [p for p in self.members() if p != self.pid]
            self._stopped = Stopped(terminated, killed, leftover)
            return self._stopped


class Supervised(Group):
    """A command started by gpu-agent, in its own process group."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        super().__init__()
        check_startable(argv, env, cwd)
        try:
            self._proc = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, start_new_session=True
            )
        except OSError as exc:  # checked a moment ago: it changed meanwhile
            raise CannotStart(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        self.pid = self._proc.pid  # also the process group's id

    def exited(self) -> bool:
        """Whether the leader has exited (without reaping it)."""
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is not None and info.si_pid == self.pid

    def members(self) -> list[int]:
        return group_members(self.pid)

    def signal(self, sig: signal.Signals) -> None:
        """Signal the command's process group (and nothing else)."""
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone
            os.killpg(self.pid, sig)

    def returncode(self) -> int:
        """Reap the leader: its exit status as a shell gives it (128 + signal if killed)."""
        code = self._proc.wait()
        return 128 - code if code < 0 else code


def runs_on(pid: int, allocation_id: str, proc: Path = Path("/proc")) -> bool:
    """Whether process `pid` was started for `allocation_id` (its environment says so:
    GPU_AGENT_ALLOCATION, which `gpu-agent run` sets and children inherit)."""
    try:
        env = (proc / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False
    return f"{ALLOCATION_ENV}={allocation_id}".encode() in env


class Adopted(Group):
    """A command another `gpu-agent run` started, which died: its process group's members
    that were started for the allocation (runs_on), so that a reused group id never makes
    this signal an unrelated process. Each is signalled by PID; its exit status is lost."""

    def __init__(self, pgid: int, allocation_id: str) -> None:
        super().__init__()
        self.pid = pgid
        self.allocation_id = allocation_id

    def members(self) -> list[int]:
        return [p for p in group_members(self.pid) if runs_on(p, self.allocation_id)]

    def exited(self) -> bool:
        return not self.members()

    def _gone(self) -> bool:
        return self.exited()

    def signal(self, sig: signal.Signals) -> None:
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def returncode(self) -> None:
        return None  # its parent, the dead `run`, was the only one that could read it

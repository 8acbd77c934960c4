"""The state directory: ledger, checkpoints and the shared epoch of a scaled clock."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from fleet.clock import Clock, ScaledClock, WallClock
from fleet.config import ClockSettings
from fleet.errors import StateDirError

LEDGER = "ledger.sqlite"
FLEET_COPY = "fleet.toml"  # the fleet a state directory ran on, beside its ledger (simulate)
CHECKPOINTS = "checkpoints.sqlite"
CLOCK = "clock.json"


def default_state_dir() -> Path:
    return Path(os.environ.get("GPU_AGENT_HOME") or ".gpu-agent")


def prepare(path: str | Path, *, create: bool, ledger_here: bool = True) -> Path:
    """The state directory, checked; created (parent must exist) only when `create`.
    `ledger_here=False`: the ledger is in a database, not in this directory."""
    return opened(path, create=create, ledger_here=ledger_here)[0]


def opened(path: str | Path, *, create: bool, ledger_here: bool = True) -> tuple[Path, bool]:
    """prepare's directory, and whether this call made it (its own mkdir did: another
    process that made it at the same moment is not us)."""
    p = Path(path)
    made = False
    if p.exists() and not p.is_dir():
        raise StateDirError(f"state directory {p} is not a directory")
    if not p.exists():
        if not create:
            raise StateDirError(
                f"state directory {p} does not exist (gpu-agent request creates it; "
                "or pass --state-dir)"
            )
        if not p.parent.is_dir():
            raise StateDirError(f"cannot create state directory {p}: {p.parent} does not exist")
        try:
            p.mkdir()
            made = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateDirError(f"cannot create state directory {p}: {exc.strerror}") from None
    if not os.access(p, os.R_OK | os.W_OK | os.X_OK):
        raise StateDirError(f"state directory {p} is not readable and writable")
    if not create and ledger_here and not (p / LEDGER).exists():
        raise StateDirError(f"state directory {p} holds no ledger ({LEDGER} is missing)")
    return p, made


def clock_for(state_dir: Path, settings: ClockSettings) -> Clock:
    """Wall time, or wall time sped up from an epoch every process of this state dir shares."""
    if settings.time_scale == 1.0:
        return WallClock()
    path = state_dir / CLOCK
    epoch = {"real": time.time(), "virtual": time.time()}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(epoch, f)
    except FileExistsError:
        try:
            epoch = json.loads(path.read_text())
            real, virtual = float(epoch["real"]), float(epoch["virtual"])
        except (ValueError, KeyError, TypeError, OSError):
            raise StateDirError(
                f"{path} is corrupt; delete it to restart the scaled clock"
            ) from None
        epoch = {"real": real, "virtual": virtual}
    return ScaledClock(settings.time_scale, epoch["real"], epoch["virtual"])


def remove_new(path: Path) -> None:
    """Take away a state directory that this very opening created, once opening failed (a
    backend it cannot reach): what was refused leaves nothing. Only while it is empty: a file
    in it may be another process's that opened it meanwhile (a ledger, the scaled clock's
    epoch), which is never removed."""
    with contextlib.suppress(OSError):
        path.rmdir()

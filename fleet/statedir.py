"""The state directory: ledger, checkpoints and the shared epoch of a scaled clock (whose
scale the ledger records: fleet.ledger.time_scale)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
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


def scale_before(state_dir: Path) -> float | None:
    """The time scale a state directory's SQLite ledger ran at before it recorded one
    (fleet.ledger.time_scale), read before this opening may write a clock.json: without one,
    no sped-up clock ever opened it, so it ran on the wall clock (1.0). With one it is not
    known (None): every opening at a time_scale other than 1 wrote one, a read-only command
    too, and did not write which, so the wall clock may have placed its allocations all the
    same."""
    return None if (state_dir / CLOCK).exists() else 1.0


def clock_of(state_dir: Path, settings: ClockSettings) -> Clock:
    """Wall time, or wall time sped up from an epoch every process of this state dir
    shares; nothing written yet: a sped-up clock from the epoch in clock.json,
    or from now where there is none, which share_epoch writes once the ledger has agreed to
    the scale (a refused opening leaves no clock.json behind). clock.json holds only the
    epoch: the scale is the ledger's (fleet.ledger.time_scale)."""
    if settings.time_scale == 1.0:
        return WallClock()
    now = time.time()
    epoch = _epoch(state_dir / CLOCK)
    return ScaledClock(settings.time_scale, *(epoch or (now, now)))


def share_epoch(state_dir: Path, clock: Clock) -> None:
    """Write a sped-up clock's epoch to clock.json for every process of this state dir, or,
    where another process wrote one first (both opened a new directory at once), take that
    one: before anything is timed on the clock, its epoch moves by the moments between. The
    file appears whole (written aside, then linked, which fails where one exists), so that a
    process reading it at that moment never finds it empty and calls it corrupt."""
    if not isinstance(clock, ScaledClock):
        return
    path = state_dir / CLOCK
    aside = state_dir / f".{CLOCK}.{os.getpid()}.{threading.get_ident()}"
    try:
        aside.write_text(json.dumps({"real": clock.epoch_real, "virtual": clock.epoch_virtual}))
        os.link(aside, path)
    except FileExistsError:
        epoch = _epoch(path)
        if epoch is not None:  # None: removed meanwhile; this clock's own epoch stands
            clock.epoch_real, clock.epoch_virtual = epoch
    except OSError as exc:
        raise StateDirError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        aside.unlink(missing_ok=True)


def _epoch(path: Path) -> tuple[float, float] | None:
    """clock.json's (real, virtual) epoch; None where there is none."""
    try:
        epoch = json.loads(path.read_text())
        return float(epoch["real"]), float(epoch["virtual"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        raise StateDirError(f"{path} is corrupt; delete it to restart the scaled clock") from None


def remove_new(path: Path) -> None:
    """Take away a state directory that this very opening created, once opening failed (a
    backend it cannot reach): what was refused leaves nothing. Only while it is empty: a file
    in it may be another process's that opened it meanwhile (a ledger, the scaled clock's
    epoch), which is never removed."""
    with contextlib.suppress(OSError):
        path.rmdir()

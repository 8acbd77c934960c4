"""Reading an allocation history: a state directory's ledger, opened read-only, and the fleet
it ran on; dates in and out."""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from fleet.config import FleetConfig, load_fleet
from fleet.errors import InvalidInput
from fleet.models import Purpose
from fleet.statedir import FLEET_COPY, LEDGER, default_state_dir


@dataclass(frozen=True)
class Record:
    """One allocation as the analysis sees it."""

    id: str
    project: str
    purpose: Purpose
    pool: Purpose
    gpu_type: str
    count: int
    state: str  # queued | active | released
    enqueued_at: float
    started_at: float | None
    ended_at: float | None  # released_at: end of the hold, or the cancellation
    last_seen: float
    reason: str | None
    price_per_hour: float
    cost_usd: float | None
    mean_util: float | None  # percent
    min_memory_gb: float | None
    pinned: bool  # the request named its GPU type (else routing chose it)
    hoarded_hours: float | None = None  # the ledger's own count (None: a ledger before v4)

    @property
    def cancelled(self) -> bool:
        return self.state == "released" and self.started_at is None


@dataclass(frozen=True)
class History:
    ledger: str
    fleet: str
    records: list[Record]
    budgets: dict[str, float]
    since: float | None = None
    until: float | None = None
    warnings: list[str] = field(default_factory=list)

    @cached_property
    def start(self) -> float:
        return min((r.enqueued_at for r in self.records), default=0.0)

    @cached_property
    def end(self) -> float:
        return max((r.last_seen for r in self.records), default=0.0)


def parse_date(value: str | None, flag: str) -> float | None:
    """An ISO date or datetime (naive means UTC) as POSIX seconds."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(
            f"{flag}: {value!r} is not an ISO date or datetime "
            "(e.g. 2026-01-01 or 2026-01-01T12:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _iso(t: float | None) -> str | None:
    # isoformat, not strftime("%Y"): the C library writes year 1 as "1", no ISO date
    return (
        None
        if t is None
        else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def resolve_fleet(state_dir: Path, explicit: str | None) -> tuple[FleetConfig, str]:
    """--fleet, else the state directory's fleet.toml, else env GPU_AGENT_FLEET, else built-in."""
    if explicit:
        return load_fleet(explicit), explicit
    copy = state_dir / FLEET_COPY
    if copy.is_file():
        return load_fleet(copy), str(copy)
    env = os.environ.get("GPU_AGENT_FLEET")
    if env:
        return load_fleet(env), env
    return load_fleet(None), "built-in default fleet"


def pool_of(purpose: Purpose, gpu_type: str, config: FleetConfig) -> Purpose:
    if gpu_type in config.pools.get(purpose, []):
        return purpose
    return next((p for p in Purpose if gpu_type in config.pools.get(p, [])), purpose)


def _open(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise InvalidInput(f"no ledger at {path} (pass --state-dir, or run gpu-agent first)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    tables = {r["name"] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"allocations", "history", "budgets"} <= tables:
        db.close()
        raise InvalidInput(f"{path} is not a gpu-agent ledger")
    return db


def _request(text: str) -> tuple[float | None, bool]:
    """(min_memory_gb, whether it named a GPU type) of a stored request."""
    try:
        raw = json.loads(text)
    except ValueError:
        return None, False
    if not isinstance(raw, dict):
        return None, False
    memory = raw.get("min_memory_gb")
    return (
        float(memory) if isinstance(memory, int | float) else None,
        bool(raw.get("gpu_type") or raw.get("type")),
    )


def _record(r: sqlite3.Row, config: FleetConfig) -> Record:
    purpose = Purpose(r["purpose"])
    memory, pinned = _request(r["request"])
    util = r["util_sum"] / r["util_n"] if r["util_n"] else r["h_util"]
    seen = max(
        t
        for t in (r["enqueued_at"], r["heartbeat_at"], r["started_at"], r["released_at"])
        if t is not None
    )
    return Record(
        id=r["id"],
        project=r["project"],
        purpose=purpose,
        pool=pool_of(purpose, r["gpu_type"], config),
        gpu_type=r["gpu_type"],
        count=int(r["count"]),
        state=r["state"],
        enqueued_at=float(r["enqueued_at"]),
        started_at=r["started_at"],
        ended_at=r["released_at"],
        last_seen=float(seen),
        reason=r["release_reason"],
        price_per_hour=float(r["price_per_hour"]),
        cost_usd=r["cost_usd"],
        mean_util=util,
        min_memory_gb=memory,
        pinned=pinned,
        hoarded_hours=r["h_hoarded"],
    )


def load_history(
    state_dir: str | Path | None,
    fleet: str | None = None,
    *,
    since: str | None = None,
    until: str | None = None,
) -> tuple[History, FleetConfig]:
    """The kept allocations of a state directory's ledger, read-only, and the fleet."""
    lo, hi = parse_date(since, "--since"), parse_date(until, "--until")
    if lo is not None and hi is not None and lo >= hi:
        raise InvalidInput(f"--since {since} is not before --until {until}")
    directory = Path(state_dir) if state_dir else default_state_dir()
    path = directory / LEDGER
    db = _open(path)
    try:
        config, source = resolve_fleet(directory, fleet)
        hoarded = (
            "h.hoarded_hours"
            if "hoarded_hours" in {c["name"] for c in db.execute("PRAGMA table_info(history)")}
            else "NULL"
        )
        rows = db.execute(
            f"SELECT a.*, h.mean_util_pct AS h_util, {hoarded} AS h_hoarded FROM allocations a "
            "LEFT JOIN history h ON h.allocation_id = a.id "
            "WHERE a.enqueued_at >= ? AND a.enqueued_at < ? ORDER BY a.enqueued_at, a.id",
            (-math.inf if lo is None else lo, math.inf if hi is None else hi),
        ).fetchall()
        budgets = dict(config.budgets) | {
            r["project"]: float(r["budget_usd"]) for r in db.execute("SELECT * FROM budgets")
        }
    finally:
        db.close()
    records = [_record(r, config) for r in rows]
    return History(
        str(path), source, records, budgets, lo, hi, _misfits(records, config, source)
    ), config


def _misfits(records: list[Record], config: FleetConfig, source: str) -> list[str]:
    """Why the fleet may not be the one the history ran on: a type it lacks, or more GPUs of
    a type held at once than it has (the pools' utilisation would pass 100 %)."""
    unknown = sorted({r.gpu_type for r in records} - set(config.catalog))
    out = (
        [
            f"the history names GPU types this fleet lacks ({', '.join(unknown)}): "
            f"is {source} the fleet it ran on?"
        ]
        if unknown
        else []
    )
    for gpu_type, peak in sorted(_peak_held(records).items()):
        has = config.gpus_of_type(gpu_type) if gpu_type in config.catalog else None
        if has is not None and peak > has:
            out.append(
                f"the history held up to {peak} {gpu_type} GPUs at once and this fleet has "
                f"{has}: is {source} the fleet it ran on?"
            )
    return out


def _peak_held(records: list[Record]) -> dict[str, int]:
    """The most GPUs of each type held at one time (an allocation still held counts to the
    end: releases come before placements at the same instant)."""
    steps: dict[str, list[tuple[float, int]]] = {}
    for r in records:
        if r.started_at is not None:
            stop = math.inf if r.ended_at is None else r.ended_at
            steps.setdefault(r.gpu_type, []).extend([(r.started_at, r.count), (stop, -r.count)])
    peaks: dict[str, int] = {}
    for gpu_type, changes in steps.items():
        level = peak = 0
        for _, n in sorted(changes, key=lambda c: (c[0], c[1])):
            level += n
            peak = max(peak, level)
        peaks[gpu_type] = peak
    return peaks

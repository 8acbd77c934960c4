"""A job's speed on each GPU type: the one place routing, the council's pricing and the
simulator read it from.

A request may name its workload (GPURequest.workload, e.g. "resnet50"). Its speed on a type,
in the catalog's relative_throughput unit (the fleet's reference type = 1), is, in this order:

1. **history**: what the project's own earlier runs of the workload measured, where they
   measured it on at least two types (one type alone says nothing about the ratio between
   types, and the ratio is all routing compares). A run counts when `gpu-agent run`'s command
   exited 0 on its allocation, from the allocation's start of work to the end of it: not a
   run that resumed another's checkpoint, nor one that another resumed (both did part of the
   work). Its measure is the work its request asked for over the time its command took: the
   request's hours on its reference type x that type's speed (table or average), over the
   hours from the command's start to its exit. Runs of one workload differ in length (a
   sweep's trials, the simulator's jobs), and the hours asked for are the only size of a run
   gpu-agent knows. What users pad onto the hours they ask for inflates every type's measure
   alike (a pad does not depend on the type a job lands on), so it leaves the ratios between
   types as they are, and the level is taken from the table, not from history (below). A
   type's measure is the median of its latest RUNS_PER_TYPE runs. A measure beyond the range
   any speed may take (fleet.config.SPEED_MIN to SPEED_MAX) is none: a command that exits 0
   within seconds of asking for hours did not do that work. Within it, a run much shorter
   than asked reads as padding (above): one such run on a type measured once moves that
   type's speed as far, until more runs' median damps it. The measured ratios between
   the types measured stand as measured; their level is set by the table (or the type
   averages) on those same types, on average (the geometric mean of table / measured), so
   that a type measured and a type not measured compare on one scale, and within the range
   any speed may take (fleet.config.SPEED_MIN to SPEED_MAX).
2. **table**: the fleet file's `[speeds.WORKLOAD]` row for the type.
3. **type average**: the type's relative_throughput (what every request got before
   workloads had speeds).

History wins over the table where it has measured: the table is a figure for the model in
general (a published benchmark, the operator's estimate); history is this project's own job,
its data pipeline, batch size and GPU count, on this fleet's GPUs. The table still matters
then: it sets the level of what history measured and speaks for the types history has not.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fleet.config import SPEED_MAX, SPEED_MIN, FleetConfig
from fleet.models import GPURequest


class Ledger(Protocol):
    """What reading a project's runs needs of fleet.ledger.Ledger (which imports this module
    through fleet.maxmin: named here, not imported)."""

    config: FleetConfig

    def query(self, sql: str, args: tuple[object, ...] | dict[str, object] = ()) -> list[Any]: ...


TABLE, HISTORY, AVERAGE = "table", "history", "type average"
RUNS_PER_TYPE = 5  # a type's speed: the median of its latest runs
RUNS_READ = 200  # the latest completed runs of the project's workload that are read
MIN_TYPES = 2  # history measures a ratio between types: it speaks from two types on


@dataclass(frozen=True)
class Speed:
    value: float  # in relative_throughput's unit
    source: str  # TABLE, HISTORY or AVERAGE

    def describe(self) -> str:
        return f"speed {self.value:.3g} ({self.source})"


def _row(config: FleetConfig, workload: str | None) -> Mapping[str, float]:
    return config.speeds.get(workload, {}) if workload is not None else {}


def table_speed(config: FleetConfig, workload: str | None, gpu_type: str) -> float:
    """`workload`'s speed on `gpu_type` by the fleet file: its [speeds] row, else the type's
    average (the simulator's jobs, which have no history, run at this speed)."""
    return _row(config, workload).get(gpu_type, config.catalog[gpu_type].relative_throughput)


def unit_price(config: FleetConfig, workload: str | None, gpu_type: str) -> float:
    """What a unit of `workload`'s work costs on `gpu_type` by the fleet file (its price per
    GPU-hour over its table speed)."""
    return config.catalog[gpu_type].price_per_hour / table_speed(config, workload, gpu_type)


def table_speeds(config: FleetConfig, workload: str | None) -> dict[str, Speed]:
    """Each catalog type's speed for `workload` by the fleet file: its [speeds] row where it
    lists the type, else the type's average."""
    row = _row(config, workload)
    return {
        t: Speed(row[t], TABLE) if t in row else Speed(spec.relative_throughput, AVERAGE)
        for t, spec in config.catalog.items()
    }


def job_speeds(
    config: FleetConfig, workload: str | None, measured: Mapping[str, float] | None = None
) -> dict[str, Speed]:
    """Each catalog type's speed for `workload`: `measured` (relative speeds per type, from
    `measured_speeds`) where it covers MIN_TYPES types, at the level of the table's on the
    same types; the table's elsewhere."""
    prior = table_speeds(config, workload)
    known = {t: m for t, m in (measured or {}).items() if t in prior}
    if len(known) < MIN_TYPES:
        return prior
    level = math.exp(statistics.fmean(math.log(prior[t].value / m) for t, m in known.items()))
    return prior | {
        t: Speed(min(max(level * m, SPEED_MIN), SPEED_MAX), HISTORY) for t, m in known.items()
    }


@dataclass(frozen=True)
class Run:
    """One completed run of a workload: the work it asked for per hour its command took."""

    gpu_type: str
    speed: float


def measured_speeds(runs: Iterable[Run]) -> dict[str, float]:
    """Each type's measure: the median of its latest RUNS_PER_TYPE runs (`runs` newest
    first); a run whose measure no speed can be (of next to no time, or of no work: beyond
    SPEED_MIN to SPEED_MAX) measures nothing."""
    per_type: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if SPEED_MIN <= r.speed <= SPEED_MAX and len(per_type[r.gpu_type]) < RUNS_PER_TYPE:
            per_type[r.gpu_type].append(r.speed)
    return {t: statistics.median(speeds) for t, speeds in per_type.items()}


# Completed runs, newest first: the command exited 0, the allocation neither resumed another's
# work nor was resumed. The LIKE narrows the rows; each request is read to be sure.
_RUNS = (
    "SELECT h.gpu_type, c.started_at, c.ended_at, a.request FROM history h "
    "JOIN commands c ON c.allocation_id = h.allocation_id "
    "JOIN allocations a ON a.id = h.allocation_id "
    "WHERE h.project = ? AND c.exit_code = 0 AND c.ended_at IS NOT NULL "
    "AND a.resumes IS NULL AND h.resumed_by IS NULL AND a.request LIKE ? "
    "ORDER BY h.ended_at DESC LIMIT ?"
)


def runs(ledger: Ledger, project: str, workload: str) -> list[Run]:
    """The project's latest completed runs of `workload` in the ledger, newest first."""
    config = ledger.config
    prior = table_speeds(config, workload)
    out = []
    for r in ledger.query(_RUNS, (project, f'%"workload":"{workload}"%', RUNS_READ)):
        request = GPURequest.model_validate_json(r["request"])
        hours = (r["ended_at"] - r["started_at"]) / 3600.0
        if request.workload != workload or hours <= 0:
            continue
        ref = request.gpu_type or config.pool(request.purpose)[0]
        if ref in prior:
            out.append(Run(r["gpu_type"], request.duration_hours * prior[ref].value / hours))
    return out


def learned_speeds(ledger: Ledger, project: str, workload: str | None) -> dict[str, float]:
    """What the project's earlier runs of `workload` measured (empty without a workload)."""
    return {} if workload is None else measured_speeds(runs(ledger, project, workload))

"""Traces of GPU jobs (submit time, duration, GPUs, project) read through a small schema
mapping, so that any trace in that shape loads: the Philly extract in ../shared/traces is the
default mapping.

A bad trace is refused with the file and line of the first bad row; rows out of time order
are sorted (the Philly extract is not sorted), never refused. A job may last at most
MAX_DURATION_S (a year; the Philly extract's longest job runs 54 days).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fleet import names
from fleet.errors import InvalidInput
from fleet.models import MAX_GPUS


@dataclass(frozen=True)
class TraceSchema:
    """Which column holds what, and in which units."""

    submit: str = "timestamp"
    duration: str = "duration"
    gpus: str = "num_gpus"
    project: str = "cluster"
    time_format: str = "%Y-%m-%d %H:%M:%S"  # strptime format, read as UTC; "epoch": seconds
    duration_seconds: float = 1.0  # seconds per unit of the duration column
    project_prefix: str = "vc-"  # prepended to the project column's value

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.submit, self.duration, self.gpus, self.project)


PHILLY = TraceSchema()

MAX_DURATION_S = 365 * 86_400.0
"""The longest job a trace may hold, in seconds: a year (Philly's longest job runs 54 days)."""


@dataclass(frozen=True)
class Job:
    project: str
    submit: float  # epoch seconds
    count: int  # GPUs
    hours: float  # how long the work runs
    line: int = 0  # the line of the trace file it came from (0: not from a file)


def read_trace(
    path: str | Path, schema: TraceSchema = PHILLY, limit: int | None = None
) -> list[Job]:
    """The jobs in submission order (ties by line); with `limit`, the earliest `limit`."""
    if limit is not None and limit < 1:
        raise InvalidInput(f"a trace limit must be at least 1, not {limit}")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(
            f"cannot read trace {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # an open quote: an error
    if not reader.fieldnames:
        raise InvalidInput(f"trace {path} is empty")
    missing = [c for c in schema.columns if c not in reader.fieldnames]
    if missing:
        raise InvalidInput(
            f"trace {path} has no column {', '.join(map(repr, missing))} "
            f"(its columns: {', '.join(reader.fieldnames)})"
        )
    try:
        jobs = [_job(row, schema, reader.line_num) for row in reader]
    except ValueError as e:
        raise InvalidInput(f"{path}:{reader.line_num}: {e}") from None
    except csv.Error as e:  # the record that failed starts after the last one read
        raise InvalidInput(f"{path}:{reader.line_num + 1}: not CSV: {e}") from None
    if not jobs:
        raise InvalidInput(f"trace {path} has a header but no jobs")
    jobs.sort(key=lambda j: (j.submit, j.line))
    return jobs[:limit]


def _job(row: dict[str, str], schema: TraceSchema, line: int) -> Job:
    raw_time = (row.get(schema.submit) or "").strip()
    try:
        if schema.time_format == "epoch":
            submit = float(raw_time)
        else:
            submit = datetime.strptime(raw_time, schema.time_format).replace(tzinfo=UTC).timestamp()
    except ValueError:
        submit = math.nan
    if not math.isfinite(submit):
        raise ValueError(f"cannot read the time {raw_time!r} in column {schema.submit!r}")
    duration = _number(row, schema.duration)
    if duration < 0:
        raise ValueError(
            f"column {schema.duration!r} must be a duration of at least 0, "
            f"not {row.get(schema.duration)!r}"
        )
    if duration * schema.duration_seconds > MAX_DURATION_S:
        raise ValueError(
            f"column {schema.duration!r} must be a duration of at most a year "
            f"({MAX_DURATION_S / schema.duration_seconds:,.0f}), not {row.get(schema.duration)!r}"
        )
    gpus = _number(row, schema.gpus)
    if not 1 <= gpus <= MAX_GPUS or gpus != int(gpus):
        raise ValueError(
            f"column {schema.gpus!r} must be a whole number of GPUs from 1 to "
            f"{MAX_GPUS:,}, not {row.get(schema.gpus)!r}"
        )
    project = (row.get(schema.project) or "").strip()
    if not project:
        raise ValueError(f"column {schema.project!r} is empty")
    why = names.problem("project", schema.project_prefix + project)
    if why is not None:  # refused here, not by the first policy that requests for it
        raise ValueError(f"column {schema.project!r} makes {why}")
    return Job(
        schema.project_prefix + project,
        submit,
        int(gpus),
        duration * schema.duration_seconds / 3600.0,
        line,
    )


def _number(row: dict[str, str], column: str) -> float:
    raw = (row.get(column) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"column {column!r} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"column {column!r} must be a finite number, not {raw!r}")
    return value

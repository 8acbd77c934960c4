"""`gpu-agent nvml record`: write what NVML reports, in the format the replay backend plays.

The format is that of ../shared/fixtures/nvml/h200-phases.json: `meta`, `device_count`,
`inventory` (static fields per GPU), `children`, `query_latency` (median and max microseconds
per call) and `samples` (one row per GPU per period, labelled with `phase`). A field NVML
would not give is stored as its error (`{"nvml_error", "class"}`), so the replay raises it
again. Only getters are called: recording never changes a card's settings.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from fleet.errors import InvalidInput
from fleet.nvml.reader import NvmlSession


def binding_version() -> str:
    try:
        return f"nvidia-ml-py {metadata.version('nvidia-ml-py')}"
    except metadata.PackageNotFoundError:
        return "unknown"


MAX_SECONDS = 86_400.0
"""The longest recording `nvml record` takes: a day."""


def check_options(seconds: float, period: float) -> None:
    """Refuse a length or period that is not finite, positive, and at most a day (the period at
    most the length), before anything is opened or written."""
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise InvalidInput(
            f"--seconds must be a positive number of seconds, at most {MAX_SECONDS:.0f} (a day)"
        )
    if not (math.isfinite(period) and 0 < period <= seconds):
        raise InvalidInput("--period must be a positive number of seconds, at most --seconds")


def record(
    session: NvmlSession,
    *,
    seconds: float,
    period: float,
    phase: str = "recorded",
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Sample every GPU each `period` for `seconds`; the recording as a JSON-ready dict."""
    check_options(seconds, period)
    session.open()
    started = clock()
    inventory = [session.static(i) for i in range(len(session.handles))]
    samples: list[dict[str, Any]] = []
    tick = 0
    while True:
        at = started + tick * period
        if at - started > seconds:
            break
        sleep(max(0.0, at - clock()))
        now = clock()
        samples.extend(session.read(i, now) | {"phase": phase} for i in range(len(session.handles)))
        tick += 1
    return {
        "meta": session.system()
        | {
            "period_s": period,
            "binding": binding_version(),
            "recorded": f"{datetime.fromtimestamp(started, UTC):%Y-%m-%d %H:%M:%S} UTC, "
            f"{len(inventory)} GPU(s), gpu-agent nvml record",
            "phases": {phase: "as labelled by --phase"},
        },
        "device_count": len(inventory),
        "inventory": inventory,
        "children": [],
        "query_latency": {
            call: {"n": len(us), "median_us": statistics.median(us), "max_us": max(us)}
            for call, us in sorted(session.latency.items())
        },
        "samples": samples,
    }


def write(recording: dict[str, Any], out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(recording, indent=1) + "\n")
    tmp.replace(out)

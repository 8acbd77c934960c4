"""What a monitored request leaves in the checkpoints, keeping every step's or the latest.

One request of one GPU for `--hours` on the default simulated fleet, through the Orchestrator on a
virtual clock (a 60-second tick), to its release, with `[checkpoints] keep = "all"` and then
`"latest"` (the default), `--runs` times each, interleaved: the thread's checkpoints and
their bytes (checkpoint, metadata and pending writes) at the end and the run's wall time;
then once more each, counting the checkpoints at every tick, for the most it held while it
ran (apart: the counting is not timed).

    .venv/bin/python benchmarks/checkpoints.py [--hours 10] [--runs 3]

The last line holds the figures: keep_all_* and keep_latest_*.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

# benchmarks/council.py would shadow the council package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.clock import VirtualClock
from fleet.config import CheckpointSettings, load_fleet
from fleet.models import Status
from graph.orchestrator import Orchestrator

THREAD = "t"
Keep = Literal["all", "latest"]


def stored(path: Path) -> tuple[int, int]:
    """(checkpoints, bytes) of the thread in a state directory's checkpoints.sqlite."""
    db = sqlite3.connect(f"file:{path / 'checkpoints.sqlite'}?mode=ro", uri=True)
    try:
        count, size = db.execute(
            "SELECT count(*), coalesce(sum(length(checkpoint) + length(metadata)), 0) "
            "FROM checkpoints WHERE thread_id = ?",
            (THREAD,),
        ).fetchone()
        (writes,) = db.execute(
            "SELECT coalesce(sum(length(value)), 0) FROM writes WHERE thread_id = ?", (THREAD,)
        ).fetchone()
    finally:
        db.close()
    return int(count), int(size) + int(writes)


def run(keep: Keep, hours: float, watch: bool = False) -> dict[str, float]:
    """One request to its release; with `watch`, its checkpoints counted at every tick."""
    config = load_fleet().model_copy(update={"checkpoints": CheckpointSettings(keep=keep)})
    with tempfile.TemporaryDirectory(prefix="gpu-agent-ckpt-") as tmp:
        state = Path(tmp) / "state"
        orch = Orchestrator(state, config, clock=VirtualClock())
        most = 0

        def count(line: dict[str, Any]) -> None:
            nonlocal most
            if line.get("node") == "monitor":
                most = max(most, stored(state)[0])

        request = {"project": "p", "purpose": "training", "count": 1, "duration_hours": hours}
        t0 = time.perf_counter()
        out = orch.request(request, thread_id=THREAD, on_progress=count if watch else None)
        seconds = time.perf_counter() - t0
        assert out.status is Status.RELEASED, out.reason
        orch.close()
        left, size = stored(state)
    return {"left": left, "bytes": size, "most": most, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not (args.hours > 0 and args.runs >= 1):
        parser.error("--hours must be above 0 and --runs at least 1")
    keeps: tuple[Keep, ...] = ("all", "latest")
    results: dict[Keep, list[dict[str, float]]] = {keep: [] for keep in keeps}
    for _ in range(args.runs):
        for keep in keeps:
            results[keep].append(run(keep, args.hours))
    most = {keep: run(keep, args.hours, watch=True)["most"] for keep in keeps}
    print(f"one GPU for {args.hours:g} h, 60-second ticks, {args.runs} runs each, interleaved")
    figures = []
    for keep, rows in results.items():
        last = rows[-1]
        seconds = [r["seconds"] for r in rows]
        print(
            f'  keep = "{keep}": {last["left"]:.0f} checkpoint(s) left, {last["bytes"]:,.0f} '
            f"bytes; at most {most[keep]:.0f} while it ran; wall "
            + ", ".join(f"{s:.2f}" for s in seconds)
            + " s"
        )
        figures.append(
            f"keep_{keep}_left={last['left']:.0f} keep_{keep}_bytes={last['bytes']:.0f} "
            f"keep_{keep}_most={most[keep]:.0f} keep_{keep}_s={statistics.median(seconds):.2f}"
        )
    print(" ".join(figures))


if __name__ == "__main__":
    main()

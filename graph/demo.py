"""`gpu-agent demo`: five teams share the default fleet for one virtual working day.

vision trains on all eight H100s; sandbox grabs two RTX 4090s and leaves them idle (released
for idling); ads serves on T4s until finance cuts its budget (released for budget); vision
and nlp both ask for H100s by name and queue for them, and nlp, which has used less, goes
first (fair share); sandbox then asks for sixteen H100s at critical priority and the council
says no.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import threading
from pathlib import Path

from fleet.clock import VirtualClock
from fleet.config import FleetConfig, load_fleet
from fleet.errors import InvalidInput
from fleet.ledger.rows import ProjectCost
from graph.orchestrator import Orchestrator
from graph.scenario import ScenarioResult, SetBudget, Step, Submit, run_scenario

STORY: list[Step] = [
    SetBudget(0.0, "ads", 40.0),
    Submit(
        0.0,
        "vision-pretrain",
        {
            "project": "vision",
            "purpose": "model_training",
            "count": 8,
            "duration_hours": 6,
            "budget_limit": 500,
        },
    ),
    Submit(
        0.1,
        "sandbox-notebook",
        {"project": "sandbox", "purpose": "research", "count": 2, "duration_hours": 4},
    ),
    Submit(
        0.2,
        "ads-serving",
        {"project": "ads", "purpose": "inference", "count": 2, "duration_hours": 12},
    ),
    Submit(
        0.5,
        "vision-finetune",
        {
            "project": "vision",
            "purpose": "training",
            "type": "H100",
            "count": 8,
            "duration_hours": 4,
        },
    ),
    Submit(
        1.0,
        "nlp-train",
        {"project": "nlp", "purpose": "training", "type": "H100", "count": 8, "duration_hours": 4},
    ),
    Submit(
        1.5,
        "sandbox-bigrun",
        {
            "project": "sandbox",
            "purpose": "training",
            "count": 16,
            "duration_hours": 24,
            "priority": "critical",
        },
    ),
    SetBudget(2.0, "ads", 4.0),
]


def demo_fleet(fleet: str | Path | None) -> FleetConfig:
    """The fleet, with 5-minute ticks and sandbox's GPUs left idle (its notebook hoards)."""
    base = load_fleet(fleet)
    return base.model_copy(
        update={
            "monitor": base.monitor.model_copy(update={"tick_seconds": 300}),
            "scheduler": base.scheduler.model_copy(update={"poll_seconds": 300}),
            "simulation": base.simulation.model_copy(update={"workloads": {"sandbox": "hoard"}}),
        }
    )


def run_demo(state_dir: str | None = None, fleet: str | None = None, as_json: bool = False) -> int:
    """The story on `fleet`, kept in `state_dir` where given: a new or empty directory, as
    its threads' names would meet those of a story told there before."""
    if state_dir and Path(state_dir).is_dir() and any(Path(state_dir).iterdir()):
        raise InvalidInput(
            f"--state-dir {state_dir} is not empty: the demo tells its story in a new state "
            "directory (or, without --state-dir, in a temporary one)"
        )
    config = demo_fleet(fleet)  # a fleet it cannot load is refused before anything is printed
    with tempfile.TemporaryDirectory(prefix="gpu-agent-demo-") as tmp:
        directory = Path(state_dir) if state_dir else Path(tmp) / "state"
        clock = VirtualClock()
        start = clock.now()
        # (at, rank, who, arrival, text): one thread's lines keep their order, and lines of
        # different threads at one instant keep the order of cause and effect (_rank)
        lines: list[tuple[float, int, str, int, str]] = []
        held: list[tuple[float, int, str, int, str]] = []  # not yet printed
        lock = threading.Lock()

        def show(before: float) -> None:
            """Print the lines of the instants before `before`, in order (see _rank)."""
            for line in sorted(x for x in held if x[0] < before):
                print(line[-1], flush=True)
            held[:] = [x for x in held if x[0] >= before]

        def report(at: float, who: str, what: str) -> None:
            with lock:
                text = f"  +{_hm(at - start)}  {who:<17} {what}"
                line = (at, _rank(what), who, len(lines), text)
                lines.append(line)
                if not as_json:
                    held.append(line)
                    show(at)

        if not as_json:
            where = f"fleet file {fleet}" if fleet else "the default fleet"
            print(f"gpu-agent demo: one virtual day on {where} (state: {directory})")
        with Orchestrator(directory, config, clock=clock) as orch:
            result = run_scenario(orch, clock, STORY, report)
            with lock:
                show(math.inf)
            costs = orch.costs()
            if as_json:
                print(
                    json.dumps(
                        {
                            "outcomes": {k: v.to_json() for k, v in result.outcomes.items()},
                            "costs": [c.__dict__ for c in costs],
                            "timeline": [text.strip() for *_, text in sorted(lines)],
                        }
                    )
                )
            else:
                print(_tables(result, costs, orch.services.clock.now() - start))
    return 0


# Within one virtual instant, lines come in the order of cause and effect, whichever thread
# the machine happened to run first: a request is asked for and a budget set, a monitor
# sees idling, the allocation is released, and then requests woken by the release are placed.
_RANKS = {
    "asks": 0,
    "sets": 1,
    "cannot": 1,
    "released": 3,
    "placed": 4,
    "queued": 4,
    "denied": 4,
    "timed_out": 4,
    "invalid": 4,
    "refused": 4,
}


def _rank(what: str) -> int:
    """Where a line goes among those of its instant (_RANKS; a monitor's event: 2)."""
    return _RANKS.get(what.split(":")[0].split()[0], 2)


def _hm(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _tables(result: ScenarioResult, costs: list[ProjectCost], elapsed: float) -> str:
    out = ["", f"{'request':<18}{'status':<10}{'GPUs':<13}{'held':>7}{'cost':>10}  why it ended"]
    for label, o in result.outcomes.items():
        a, r = o.allocation, o.release
        gpus = f"{a.count} x {a.gpu_type}" if a else "-"
        held = f"{r.hours:.2f} h" if r else "-"
        why = r.reason.value if r else o.reason
        out.append(
            f"{label:<18}{o.status.value:<10}{gpus:<13}{held:>7}{f'${o.cost_usd:,.2f}':>10}  {why}"
        )
    out += ["", f"{'project':<12}{'spent':>10}{'budget':>10}"]
    for c in costs:
        budget = "-" if c.budget_usd is None else f"${c.budget_usd:,.2f}"
        out.append(f"{c.project:<12}{f'${c.spent_usd:,.2f}':>10}{budget:>10}")
    nlp, vision = result.outcomes.get("nlp-train"), result.outcomes.get("vision-finetune")
    if (
        nlp
        and vision
        and nlp.allocation
        and vision.allocation
        and nlp.allocation.started_at < vision.allocation.started_at
    ):
        out.append(
            "\nnlp-train queued after vision-finetune but ran first: vision had used "
            "far more GPU-hours (fair share)."
        )
    out.append(f"\nvirtual time used: {_hm(elapsed)}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(run_demo())

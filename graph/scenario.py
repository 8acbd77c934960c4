"""Run timed steps (requests, budget changes) through the real Orchestrator in virtual time.

Each step is an actor on a VirtualClock, so requests that overlap in time wait for each other,
queue and release exactly as they would on the wall clock, in a fraction of a second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleet.budget import describe_moves
from fleet.clock import VirtualClock
from fleet.errors import GPUAgentError
from fleet.models import Event
from graph.orchestrator import Orchestrator
from graph.outcome import RequestOutcome


@dataclass(frozen=True)
class Submit:
    at_hours: float
    label: str
    request: dict[str, Any]


@dataclass(frozen=True)
class SetBudget:
    at_hours: float
    project: str
    usd: float


Step = Submit | SetBudget
Reporter = Callable[[float, str, str], None]  # (virtual time, who, what)


@dataclass
class ScenarioResult:
    outcomes: dict[str, RequestOutcome] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # refused steps: label -> why


def run_scenario(
    orch: Orchestrator, clock: VirtualClock, steps: list[Step], report: Reporter
) -> ScenarioResult:
    start = clock.now()
    result = ScenarioResult()
    lock = threading.Lock()

    def submit(step: Submit) -> None:
        def on_event(event: Event) -> None:
            report(event.at.timestamp(), step.label, f"{event.kind.value}: {event.message}")

        report(clock.now(), step.label, f"asks for {_ask(step.request)}")
        try:
            outcome = orch.request(step.request, thread_id=step.label, on_event=on_event)
        except GPUAgentError as exc:
            with lock:
                result.errors[step.label] = str(exc)
            report(clock.now(), step.label, f"refused: {exc}")
            return
        with lock:
            result.outcomes[step.label] = outcome
        if outcome.allocation is None:
            report(clock.now(), step.label, f"{outcome.status.value}: {outcome.reason}")

    def set_budget(step: SetBudget) -> None:
        try:
            moved = orch.set_budget(step.project, step.usd)
        except GPUAgentError as exc:
            with lock:
                result.errors[f"budget {step.project} @{step.at_hours:g}h"] = str(exc)
            report(clock.now(), "finance", f"cannot set {step.project}'s budget: {exc}")
            return
        note = f"; {describe_moves(moved)}" if moved else ""
        report(clock.now(), "finance", f"sets {step.project}'s budget to ${step.usd:,.2f}{note}")

    with clock.actor():  # no step may run ahead before all are spawned
        threads = [
            clock.spawn(
                submit if isinstance(s, Submit) else set_budget, s, at=start + s.at_hours * 3600.0
            )
            for s in steps
        ]
    for t in threads:
        t.join()
    return result


def _ask(r: dict[str, Any]) -> str:
    kind = r.get("gpu_type") or r.get("purpose", "training")
    return f"{r.get('count', 1)} GPU(s) for {kind}, {r['duration_hours']:g} h" + (
        f", priority {r['priority']}" if r.get("priority") else ""
    )

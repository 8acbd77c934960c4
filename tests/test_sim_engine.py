"""The simulator's engine runs the graph's own nodes: it must end every request exactly where
LangGraph does, and the monitor's skipped ticks must conclude what ticking would have."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from council.stream_release import shipped
from fleet.clock import VirtualClock
from fleet.config import MonitorSettings
from fleet.models import EventKind, GPUSample, MonitorState, Purpose, utc
from fleet.monitoring import UNKNOWN, IdlePolicy, Work, assess, next_tick, readings, skip
from fleet.validation import parse_request
from graph.demo import STORY, demo_fleet
from graph.orchestrator import Orchestrator
from graph.scenario import SetBudget, Submit, run_scenario
from nodes.context import open_services
from nodes.wiring import NODES, ROUTERS
from sim.engine import Engine, EventClock, GraphThread

START = 1_767_225_600.0


def _outcome(status: Any, allocation: Any, release: Any, cost: float) -> tuple[Any, ...]:
    return (
        status.value,
        None
        if allocation is None
        else (allocation.gpu_type, allocation.node, allocation.started_at),
        None
        if release is None
        else (release.reason.value, release.released_at, round(release.cost_usd, 6)),
        round(cost, 6),
    )


def test_the_engine_ends_the_demo_exactly_as_langgraph_does(tmp_path: Path) -> None:
    """The demo story (queueing, fair share, an idle release, a budget cut, a council
    denial) through the compiled LangGraph graph with threads on a VirtualClock, and through
    the engine: every request ends with the same status, GPUs, times and cost."""
    config = demo_fleet(None)
    clock = VirtualClock(START)
    with Orchestrator(tmp_path / "graph", config, clock=clock) as orch:
        result = run_scenario(orch, clock, STORY, lambda *_: None)
    expected = {
        k: _outcome(o.status, o.allocation, o.release, o.cost_usd)
        for k, o in result.outcomes.items()
    }

    events = EventClock(START)
    services = open_services(tmp_path / "engine", config, clock=events)
    ended: dict[str, tuple[Any, ...]] = {}

    def finished(thread: GraphThread) -> None:
        s = thread.state
        ended[thread.id] = _outcome(
            s["status"], s.get("allocation"), s.get("release"), s.get("cost_usd", 0.0)
        )

    engine = Engine(services, events, reviewer=lambda _q: True, finished=finished)
    for step in STORY:
        at = START + step.at_hours * 3600.0
        if isinstance(step, Submit):
            request = parse_request(step.request)
            engine.call_at(at, functools.partial(engine.submit, step.label, request, at))
        elif isinstance(step, SetBudget):
            engine.call_at(at, functools.partial(services.set_budget, step.project, step.usd))
    engine.run()
    services.close()
    assert ended == expected
    assert engine.steps["monitor"] > 0 and engine.steps["wait"] > 0


def test_the_engine_runs_the_graphs_own_nodes_and_routers() -> None:
    engine_nodes = Engine.__init__.__defaults__
    assert engine_nodes is not None and NODES in engine_nodes
    assert set(ROUTERS) <= set(NODES)


# ---- skipping ticks ---------------------------------------------------------------------

MON = MonitorSettings()
TICK = MON.tick_seconds


def _samples(util: float, at: float, n: int = 2) -> list[GPUSample]:
    return [GPUSample(gpu_id=f"g{i}", at=utc(at), util_pct=util, temp_c=40.0) for i in range(n)]


def _tick_by_tick(
    levels: list[tuple[float, float]], started: float, end: float, policy: IdlePolicy = UNKNOWN
) -> tuple[list[tuple[float, str]], MonitorState]:
    """Every tick, as a monitor on real GPUs runs them: (time, event) and the last state."""
    state = MonitorState(last_tick_at=utc(started))
    out: list[tuple[float, str]] = []
    t = started + TICK
    while t < end:
        result = assess(_samples(_level(levels, t), t), state, MON, t, started, policy)
        state = result.state
        out += [(t, e.kind.value) for e in result.events]
        if result.release:
            break
        t += TICK
    return out, state


def _skipping(
    levels: list[tuple[float, float]], started: float, end: float, policy: IdlePolicy = UNKNOWN
) -> tuple[list[tuple[float, str]], MonitorState]:
    """The same with the simulated monitor: sleep to `next_tick`, `skip`, then assess."""
    state = MonitorState(last_tick_at=utc(started))
    out: list[tuple[float, str]] = []
    last = None
    while True:
        t0 = state.last_tick_at.timestamp()  # type: ignore[union-attr]
        t = t0 + TICK
        if last is not None:
            t = min(
                end, next_tick(state, last, MON, TICK, started, _change_after(levels, t0), policy)
            )  # a running command's pause may never conclude
            state = skip(state, last, MON, TICK, started, t)
        if t >= end:
            return out, state
        samples = _samples(_level(levels, t), t)
        result = assess(samples, state, MON, t, started, policy)
        state = result.state
        out += [(t, e.kind.value) for e in result.events]
        if result.release:
            return out, state
        last = readings(samples, MON)


def _level(levels: list[tuple[float, float]], t: float) -> float:
    return [u for start, u in levels if start <= t][-1]


def _change_after(levels: list[tuple[float, float]], t: float) -> float:
    return min((start for start, _ in levels if start > t), default=float("inf"))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 240), st.sampled_from([0.0, 3.0, 12.0, 35.0, 80.0])),
        min_size=1,
        max_size=8,
    ),
    st.integers(0, 59),
    st.sampled_from(["unknown", "done", "running"]),
    st.booleans(),
)
def test_skipped_ticks_conclude_what_every_tick_concludes(
    phases: list[tuple[int, float]], offset: int, work: Work, stream: bool
) -> None:
    """Piecewise-constant readings (phases of 1-240 minutes at idle, bursty, low and busy
    levels), whatever the command's state, with the timeout or the shipped stream model
    deciding: the same warnings and idle release at the same ticks, the same totals, the
    same longest pause (which moves the release when no command is known) and the same
    stream."""
    model = functools.partial(shipped().after, lease_hours=6.0) if stream else None
    policy = IdlePolicy(Purpose.TRAINING, work, release_after=model)
    started = START + offset
    levels, t = [], started
    for minutes, util in phases:
        levels.append((t, util))
        t += minutes * 60.0
    end = t + 3 * 3600.0
    levels.append((t, 0.0))
    ticked, a = _tick_by_tick(levels, started, end, policy)
    skipped, b = _skipping(levels, started, end, policy)
    assert skipped == ticked
    if ticked and ticked[-1][1] == EventKind.IDLE.value:
        assert b.ticks == a.ticks and b.util_n == a.util_n
        assert b.longest_pause_s == a.longest_pause_s
        assert b.util_sum == pytest.approx(a.util_sum)
        assert b.low_util_warned == a.low_util_warned
        assert b.stream == a.stream and b.stretch_n == a.stretch_n
        assert b.stretch_util_sum == pytest.approx(a.stretch_util_sum)


def test_a_monitor_without_promises_runs_every_tick() -> None:
    state = MonitorState(last_tick_at=utc(START))
    last = readings(_samples(0.0, START), MON)
    assert next_tick(state, last, MON, TICK, START, START) == START + TICK


def test_idle_readings_wake_the_monitor_twice() -> None:
    """Idle from the first tick: the monitor wakes for the low-utilisation warning (once the
    10-minute window is full), then at the 30-minute idle timeout, and at no tick between."""
    state = MonitorState(last_tick_at=utc(START))
    t = START + TICK
    state = assess(_samples(0.0, t), state, MON, t, START).state
    last = readings(_samples(0.0, t), MON)
    warn = next_tick(state, last, MON, TICK, START, float("inf"))
    assert warn == START + MON.low_util_window_minutes * 60.0
    result = assess(
        _samples(0.0, warn), skip(state, last, MON, TICK, START, warn), MON, warn, START
    )
    assert [e.kind for e in result.events] == [EventKind.LOW_UTILIZATION]
    release = next_tick(result.state, last, MON, TICK, START, float("inf"))
    assert release == t + MON.idle_timeout_minutes * 60.0


def test_a_lease_ending_between_microseconds_ends_on_time(tmp_path: Path) -> None:
    """The monitor plans its next tick at the end of each one (MonitorState.wake_at). A lease
    whose end is no whole microsecond must still end exactly there, once: a plan kept at a
    datetime's precision would wake just before it, tick, and plan the same instant again."""
    config = demo_fleet(None)
    at = START + 0.2677422
    events = EventClock(at)
    services = open_services(tmp_path / "engine", config, clock=events)
    ended: list[GraphThread] = []
    engine = Engine(services, events, reviewer=lambda _q: True, finished=ended.append)
    request = parse_request(
        {"project": "vision", "purpose": "inference", "count": 1, "duration_hours": 0.25}
    )
    engine.call_at(at, lambda: engine.submit("short", request, at))
    engine.run(until=at + 86400.0)
    services.close()
    (thread,) = ended
    release = thread.state["release"]
    assert release.reason.value == "lease-expired"
    assert release.released_at.timestamp() == pytest.approx(at + 900.0, abs=1e-6)
    assert engine.steps["monitor"] <= 900.0 / TICK + 2  # one node run per tick at most

"""One monitoring tick: sleep to the next tick, read the GPUs, warn, throttle, decide release.

The ledger's deadline (lease end, or earlier when a budget was cut) is re-read every tick. When
the backend knows the readings will stay the same (a simulated trace), the monitor sleeps
through the ticks that could conclude nothing new (fleet.monitoring.next_tick and skip).
"""

from __future__ import annotations

from langgraph.runtime import Runtime

from fleet.clock import sleep_until
from fleet.commands import work
from fleet.faults import fault
from fleet.ledger import Lease
from fleet.models import EventKind, Purpose, utc
from fleet.monitoring import IdlePolicy, Work, assess, next_tick, readings, skip
from nodes.context import Context, services_for
from nodes.progress import report, streaming
from nodes.state import State, request_of


def _ended(row: Lease, now: float) -> State | None:
    """The release this tick must make, if the allocation is over."""
    if row.state == "released":
        assert row.release_reason is not None and row.released_at is not None
        return {"release_reason": row.release_reason, "release_at": utc(row.released_at)}
    assert row.deadline is not None and row.deadline_reason is not None
    if now >= row.deadline:
        return {"release_reason": row.deadline_reason, "release_at": utc(row.deadline)}
    return None


def _policy(work: Work, purpose: Purpose, works_while_idle: bool) -> IdlePolicy:
    """What idling means here: a work that went on while idle is treated as running."""
    return IdlePolicy(purpose, "running" if works_while_idle and work == "unknown" else work)


def _tick_text(ticks: int, util: float | None, left_s: float) -> str:
    shown = "n/a" if util is None else f"{util:.0f}%"
    return f"tick {ticks}: utilisation {shown}, {left_s / 3600:.2f} h left"


def monitor(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    allocation = state["allocation"]
    mon = state["monitor"]
    svc.watch(allocation.id, allocation.thread_id)
    row = svc.ledger.lease(allocation.id)
    ended = _ended(row, svc.clock.now())
    if ended:
        return ended
    assert row.deadline is not None and mon.last_tick_at is not None
    settings, tick = svc.config.monitor, svc.config.monitor.tick_seconds
    started = allocation.started_at.timestamp()
    purpose = request_of(state).purpose
    policy = _policy(work(row), purpose, mon.works_while_idle)
    last = readings(state["samples"], settings) if state.get("samples") else None
    wake = mon.last_tick_at.timestamp() + tick
    if last is not None:  # ticks that would read the same and conclude nothing are skipped
        steady = svc.backend.steady_until(allocation.gpu_ids, mon.last_tick_at.timestamp())
        wake = next_tick(mon, last, settings, tick, started, steady, policy)
    before = svc.clock.now()
    sleep_until(svc.clock, min(wake, row.deadline), svc.waker(allocation.id))
    svc.check_watched(allocation.id)  # adopted elsewhere while this process was silent
    now = svc.clock.now()
    if now != before:  # time passed: the allocation may have ended meanwhile
        row = svc.ledger.lease(allocation.id)
        ended = _ended(row, now)
        if ended:
            return ended
        policy = _policy(work(row), purpose, mon.works_while_idle)
    if last is not None:
        mon = skip(mon, last, settings, tick, started, now)
    samples = svc.sample(allocation.gpu_ids, now,
                         dict.fromkeys(allocation.gpu_ids, allocation.project))
    result = assess(samples, mon, settings, now, started, policy)
    for gpu_id in result.throttle:  # its event says what the backend did about it
        action = svc.backend.throttle(gpu_id)
        for event in result.events:
            if event.kind is EventKind.THROTTLE and event.gpu_id == gpu_id:
                event.message = f"{event.message}: {action}"
    idle = result.state.idle_since
    svc.ledger.heartbeat(allocation.id, now, result.state.ticks, result.state.util_sum,
                         result.state.util_n, result.mean_util,
                         idle.timestamp() if idle is not None else None)
    fault("monitor:heartbeat")
    if streaming(runtime):
        left = (row.deadline or now) - now
        report(runtime, "monitor", _tick_text(result.state.ticks, result.mean_util, left),
               tick=result.state.ticks, util_pct=result.mean_util, seconds_left=left)
    update: State = {"monitor": result.state, "samples": samples}
    if result.events:
        update["events"] = result.events
    if result.release is not None:
        update |= {"release_reason": result.release, "release_at": utc(now)}
    return update

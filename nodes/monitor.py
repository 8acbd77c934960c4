"""One monitoring tick: sleep to the next tick, read the GPUs, warn, throttle, decide release.

Each tick plans the next (`MonitorState.wake_at`) from what it read, so the node starts by
sleeping: a node runs again from its first line after a sleep (LangGraph after `interrupt()`,
sim.engine after every sleep), and work before the sleep would be done twice. A release or a
deadline moved meanwhile wakes it early. The ledger's deadline (lease end, or earlier when a
budget was cut) is re-read every tick. When the backend knows the readings will stay the same
(a simulated trace), the monitor sleeps through the ticks that could conclude nothing new
(fleet.monitoring.next_tick and skip). A lease held a term at a time is decided on once per
term, a tick and any checkpoint notice before the term ends (fleet.monitoring.renews): renewed
in the ledger (Ledger.renew), or left to end with its term.
"""

from __future__ import annotations

import math

from langgraph.runtime import Runtime

from fleet.clock import sleep_until
from fleet.config import MonitorSettings
from fleet.faults import fault
from fleet.ledger.rows import Lease
from fleet.left_running import notice_if_due
from fleet.models import Allocation, Event, EventKind, GPURequest, MonitorState, utc
from fleet.monitoring import (
    IdlePolicy,
    Readings,
    Work,
    assess,
    decided_at,
    next_tick,
    readings,
    renewal_lead_s,
    renewal_reason,
    skip,
)
from fleet.services import Services
from nodes.context import Context, release_after, services_for
from nodes.progress import report, streaming
from nodes.state import State, guardrails_of, request_of


def _as_held(allocation: Allocation, row: Lease, declined: bool = False) -> State:
    """The thread's allocation where the ledger's lease changed (Lease.held: a term renewed,
    a lease cut by a preemption, a term its monitor let end), so that what the thread says
    is what the ledger holds; {} where nothing changed."""
    held = row.held(allocation, declined)
    return {} if held is allocation else {"allocation": held}


def _as_ended(allocation: Allocation, row: Lease, svc: Services) -> State:
    """_as_held at its end: whether a term was let end is asked of the ledger, since the
    tick that declined it may not have reached the thread (its process died after the
    decline and before that tick's checkpoint)."""
    declined = row.renew_hours is not None and svc.ledger.declined(allocation.id)
    return _as_held(allocation, row, declined)


def _ended(row: Lease, now: float, svc: Services, aid: str) -> State | None:
    """The release this tick must make, if the allocation is over: in the ledger, or where a
    cluster's scheduler holds the GPUs (Slurm), by the scheduler (whose job's time limit
    follows the ledger's deadline meanwhile)."""
    if row.state == "released":
        assert row.release_reason is not None and row.released_at is not None
        return {"release_reason": row.release_reason, "release_at": utc(row.released_at)}
    assert row.deadline is not None and row.deadline_reason is not None
    if now >= row.deadline:
        return {"release_reason": row.deadline_reason, "release_at": utc(row.deadline)}
    gone = svc.follow(aid, row.deadline)
    if gone is None:
        return None
    assert gone.at is not None
    return {
        "release_reason": gone.reason,
        "release_at": utc(gone.at),
        "events": [Event(at=utc(now), kind=EventKind.SCHEDULER, message=gone.why)],
    }


def _policy(
    work: Work, state: State, mon: MonitorState, svc: Services, placed_end: float | None = None
) -> IdlePolicy:
    """What idling means here: a work that went on while idle is treated as running; the
    council's guardrails, where it approved with them and no human dropped them, shorten
    the timeout (and where they say so, the stream model may release sooner), unless an
    idle release already ended the work this allocation resumes (a second kill in the next
    pause would cost the work twice); where the fleet says so, the stream model says when to
    release, with the same exception (its own timeout and pause factor then apply).
    `placed_end`: where the lease asked ends in the ledger, which the stream model reads
    where a preemption or a declined term cut the thread's lease (nodes.context.release_after)."""
    spared = mon.guard_spared
    rails = None if spared else guardrails_of(state)
    # the stream only while the fleet still reads it (its model is loaded at start-up then:
    # nodes.context.check_models)
    stream = (
        rails is not None
        and rails.idle_stream
        and svc.config.council.guard_idle_release == "stream"
    )
    return IdlePolicy(
        request_of(state).purpose,
        "running" if mon.works_while_idle and work == "unknown" else work,
        None if rails is None else rails.idle_minutes,
        None if spared else release_after(svc, state["allocation"], placed_end, stream),
    )


def _renewal(row: Lease, mon: MonitorState, request: GPURequest, svc: Services) -> float | None:
    """When the term under way is decided on (fleet.monitoring.renewal_lead_s before it
    ends, never before its middle); None: nothing left to decide."""
    if not row.renewable or mon.renewal_for == row.lease_end:
        return None
    assert row.lease_end is not None and row.renew_hours is not None
    lead = renewal_lead_s(svc.config.monitor, request.notice_seconds, svc.scheduler_holds)
    return decided_at(row.lease_end, row.renew_hours, lead)


def _renew(row: Lease, mon: MonitorState, now: float, svc: Services, aid: str) -> Event:
    """Decide on the term under way (`mon` remembers it): renewed while the GPUs work, else
    left to end at the term's end."""
    assert row.lease_end is not None and row.renew_hours is not None
    mon.renewal_for = row.lease_end
    term = f"{round(row.renew_hours, 2):g} h term"
    ends = f"{utc(row.lease_end):%Y-%m-%d %H:%M:%S} UTC"
    began = row.lease_end - row.renew_hours * 3600.0
    why = renewal_reason(mon, svc.config.monitor, now, began)
    if why is None:
        assert mon.idle_since is not None
        idle = (now - mon.idle_since.timestamp()) / 3600.0
        why = f"every GPU idle for {idle:.2f} h, all its {term}; it ends at {ends}"
        if svc.ledger.decline(aid, row.lease_end, now, why):
            return Event(at=utc(now), kind=EventKind.LEASE, message=f"lease not renewed: {why}")
        return _set_meanwhile(now)
    done = svc.ledger.renew(aid, row.lease_end, now, f"{why} (a {term})")
    if done is None:  # its end was set meanwhile, or the term declined before a restart
        return _set_meanwhile(now)
    svc.moved(done.moved)
    svc.follow(aid, done.deadline)  # a scheduler's time limit covers the new term
    message = f"lease renewed to {utc(done.lease_end):%Y-%m-%d %H:%M:%S} UTC: {why}"
    if done.deadline < done.lease_end:
        message += f"; its budget ends it at {utc(done.deadline):%Y-%m-%d %H:%M:%S} UTC"
    return Event(at=utc(now), kind=EventKind.LEASE, message=message)


def _set_meanwhile(now: float) -> Event:
    """A term neither renewed nor declined here: its end was set since the lease was read
    (or, for a renewal, its monitor declined it before a restart)."""
    why = (
        "its end was set meanwhile (a budget, a preemption, a release, or its monitor "
        "declining the term before a restart)"
    )
    return Event(at=utc(now), kind=EventKind.LEASE, message=f"lease not renewed: {why}")


def _last(state: State, settings: MonitorSettings) -> Readings | None:
    """What the tick before read (None before the first)."""
    return readings(state["samples"], settings) if state.get("samples") else None


def _tick_text(ticks: int, util: float | None, left_s: float) -> str:
    shown = "n/a" if util is None else f"{util:.0f}%"
    return f"tick {ticks}: utilisation {shown}, {left_s / 3600:.2f} h left"


def _wake(
    row: Lease,
    mon: MonitorState,
    last: Readings | None,
    policy: IdlePolicy,
    started: float,
    gpu_ids: list[str],
    svc: Services,
    renew_at: float | None = None,
) -> float:
    """When the tick after `mon`'s is due: the next one, or the first that can conclude
    something new where the backend knows the readings stay the same; never past the
    allocation's deadline, nor past when its term is decided on (`renew_at`)."""
    assert row.deadline is not None and mon.last_tick_at is not None
    settings, tick = svc.config.monitor, svc.config.monitor.tick_seconds
    wake = mon.last_tick_at.timestamp() + tick
    if last is not None:  # ticks that would read the same and conclude nothing are skipped
        steady = svc.backend.steady_until(gpu_ids, mon.last_tick_at.timestamp())
        wake = next_tick(mon, last, settings, tick, started, steady, policy)
    return min(wake, row.deadline, math.inf if renew_at is None else renew_at)


_NOTICED = "checkpoint notice sent to the command a `gpu-agent run` that died left running"


def monitor(state: State, runtime: Runtime[Context]) -> State:
    svc = services_for(runtime)
    allocation = state["allocation"]
    mon = state["monitor"]
    svc.watch(allocation.id, allocation.thread_id)
    settings, tick = svc.config.monitor, svc.config.monitor.tick_seconds
    started = allocation.started_at.timestamp()
    if mon.wake_at is None:  # the first tick, or a checkpoint from before ticks were planned
        row = svc.ledger.lease(allocation.id)
        ended = _ended(row, svc.clock.now(), svc, allocation.id)
        if ended:
            return ended | _as_ended(allocation, row, svc)
        policy = _policy(svc.work(row), state, mon, svc, row.asked_end)
        renew_at = _renewal(row, mon, request_of(state), svc)
        last = _last(state, settings)
        wake = _wake(row, mon, last, policy, started, allocation.gpu_ids, svc, renew_at)
    else:  # planned by the last tick, which read the lease at the same moment
        wake = mon.wake_at
    sleep_until(svc.clock, wake, svc.waker(allocation.id))
    last = _last(state, settings)  # read after the sleep: a sleep that parks re-runs the node
    svc.check_watched(allocation.id)  # adopted elsewhere while this process was silent
    now = svc.clock.now()
    row = svc.ledger.lease(allocation.id)  # the allocation may have ended meanwhile
    ended = _ended(row, now, svc, allocation.id)
    if ended:
        return ended | _as_ended(allocation, row, svc)
    assert row.deadline is not None
    policy = _policy(svc.work(row), state, mon, svc, row.asked_end)
    if last is not None:
        mon = skip(mon, last, settings, tick, started, now)
    samples = svc.sample(
        allocation.gpu_ids, now, dict.fromkeys(allocation.gpu_ids, allocation.project)
    )
    result = assess(samples, mon, settings, now, started, policy)
    for gpu_id in result.throttle:  # its event says what the backend did about it
        action = svc.backend.throttle(gpu_id)
        for event in result.events:
            if event.kind is EventKind.THROTTLE and event.gpu_id == gpu_id:
                event.message = f"{event.message}: {action}"
    idle = result.state.idle_since
    svc.ledger.heartbeat(
        allocation.id,
        now,
        result.state.ticks,
        result.state.util_sum,
        result.state.util_n,
        result.mean_util,
        idle.timestamp() if idle is not None else None,
    )
    fault("monitor:heartbeat")
    noticed = notice_if_due(svc.ledger, allocation.id, row, now)
    if streaming(runtime):
        left = row.deadline - now
        report(
            runtime,
            "monitor",
            _tick_text(result.state.ticks, result.mean_util, left),
            tick=result.state.ticks,
            util_pct=result.mean_util,
            seconds_left=left,
        )
    ticked = result.state
    events = result.events
    if noticed:
        events = [*events, Event(at=utc(now), kind=EventKind.COMMAND, message=_NOTICED)]
    declined = False
    if result.release is None:  # decide on the term if due, and plan the next tick
        request = request_of(state)
        renew_at = _renewal(row, ticked, request, svc)
        if renew_at is not None and now >= renew_at:
            events = [*events, _renew(row, ticked, now, svc, allocation.id)]
            row = svc.ledger.lease(allocation.id)
            declined = svc.ledger.declined(allocation.id)  # once per term
            renew_at = _renewal(row, ticked, request, svc)
        last_read = readings(samples, settings)
        ticked.wake_at = _wake(
            row, ticked, last_read, policy, started, allocation.gpu_ids, svc, renew_at
        )
    update: State = {"monitor": ticked, "samples": samples, **_as_held(allocation, row, declined)}
    if events:
        update["events"] = events
    if result.release is not None:
        update |= {"release_reason": result.release, "release_at": utc(now)}
    return update

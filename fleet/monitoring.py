"""What one monitoring tick concludes from the readings of an allocation's GPUs.

- low utilisation: the mean over the last `low_util_window_minutes` is under `low_util_pct`
  (a warning, once per low spell);
- idle: every GPU under `idle_util_pct`; idle for `idle_limit_s` means release. Idleness is
  evidence that the work is done only where nothing else is known: while a command runs under
  `gpu-agent run` an idle spell is a pause and never ends the allocation (its lease and budget
  bound a hung command); once it has exited, the work is done and the idle tail is released
  after `idle_timeout_done_minutes` (0: at the first idle tick); with no command known (a
  notebook, a shell), after the purpose's timeout (`idle_timeout_by_purpose`, else
  `idle_timeout_minutes`), or the shorter timeout of an approval with guardrails
  (council.guardrails; not where an idle release already ended the work the allocation
  resumes, MonitorState.guard_spared). But for the tail, none is shorter than
  `pause_factor` x the longest pause the job has already come back from, in this allocation
  or in the one it resumes (`GPURequest.resumes`): a job that paused for 40 minutes is not
  released after 30. With `idle_release = "stream"` a model that reads the allocation's
  utilisation stream (council.stream_release, given as `IdlePolicy.release_after`) says,
  once in each idle stretch where no command is known, when to release instead of the
  timeout and the pause factor (an approval's guardrails still shorten it);
- a lease held a term at a time (an approval's guardrails, `[council] guard_lease_hours`) is
  renewed while its GPUs work (`renews`): not where every GPU has sat idle since the term
  began, and for longer than `pause_factor` x the longest pause the work came back from,
  which under a running command is how a hung command stops holding its GPUs (work that
  resumes what an idle release or a term ended is renewed: MonitorState.guard_spared);
- hot: a GPU over `throttle_temp_c` is throttled (once per allocation);
- unhealthy: a GPU with an XID error or lost ends the allocation at once.
A reading whose field is unavailable (None) counts neither for nor against a conclusion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from fleet.config import MonitorSettings
from fleet.models import Event, EventKind, GPUSample, MonitorState, Purpose, ReleaseReason, utc

Work = Literal["running", "done", "unknown"]  # what `gpu-agent run` says of the allocation


@dataclass(frozen=True)
class IdlePolicy:
    """What an idle spell means for this allocation: its purpose and its command's state."""

    purpose: Purpose = Purpose.TRAINING
    work: Work = "unknown"
    # an approval with guardrails' stricter timeout where no command is known (its minutes)
    guard_minutes: float | None = None
    # where the release reads the stream: the stretches before an idle one, (utilisation %,
    # hours), to the hours of idling after which to release (council.stream_release)
    release_after: Callable[[tuple[tuple[float, float], ...]], float] | None = None


STREAM_STRETCHES = 64  # the stream's stretches kept in the state; the oldest are merged


UNKNOWN = IdlePolicy()  # nothing known but utilisation (a training job's timeout)


def idle_limit_s(
    settings: MonitorSettings,
    policy: IdlePolicy,
    longest_pause_s: float,
    stream_limit_s: float | None = None,
) -> float:
    """How long every GPU may sit idle before the allocation is released (inf: never);
    `stream_limit_s`: what the stream model said at the idle stretch's start, which replaces
    the timeout and the pause factor (a guardrail's rule, where shorter, still applies)."""
    if policy.work == "running":
        return math.inf
    if policy.work == "done":
        return settings.idle_timeout_done_minutes * 60.0
    minutes = settings.idle_timeout_by_purpose.get(policy.purpose, settings.idle_timeout_minutes)
    if policy.guard_minutes is not None:
        minutes = min(minutes, policy.guard_minutes)
    rule = max(minutes * 60.0, settings.pause_factor * longest_pause_s)
    if stream_limit_s is None:
        return rule
    return stream_limit_s if policy.guard_minutes is None else min(stream_limit_s, rule)


# Slurm sends a job's --signal up to this much before the time it was asked for
SLURM_SIGNAL_EARLY_S = 60.0


def renewal_lead_s(settings: MonitorSettings, notice_s: float | None, scheduler: bool) -> float:
    """How long before a term ends its monitor decides whether to renew it: a tick, and the
    command's checkpoint notice (and Slurm's early signal, where Slurm sends it), so that a
    renewed term sends the command no notice."""
    early = SLURM_SIGNAL_EARLY_S if scheduler and notice_s else 0.0
    return settings.tick_seconds + (notice_s or 0.0) + early


def term_hours(guard_hours: float, lead_s: float) -> float:
    """The term a guarded lease is held for: the guardrails' hours, but at least twice the
    lead with which its monitor decides on renewing it, so that each decision reads at least
    half a term."""
    return max(guard_hours, 2.0 * lead_s / 3600.0)


def decided_at(term_end: float, term_h: float, lead_s: float) -> float:
    """When the term of `term_h` hours that ends at `term_end` is decided on: `lead_s`
    before it ends (renewal_lead_s), never before its middle."""
    return max(term_end - lead_s, term_end - term_h * 1800.0)


# how late, in ticks, a tick may land and still be the term's first (renewal_reason): on the
# virtual clock ticks land on time, so no figure moves; the next tick is a whole tick later
TICK_SLACK = 0.5


def renews(state: MonitorState, settings: MonitorSettings, now: float, term_began: float) -> bool:
    """Whether a lease held a term at a time is renewed at `now`, near the end of the term
    that began at `term_began` (renewal_reason)."""
    return renewal_reason(state, settings, now, term_began) is not None


def renewal_reason(
    state: MonitorState, settings: MonitorSettings, now: float, term_began: float
) -> str | None:
    """Why the term that began at `term_began` is renewed at `now`, near its end, as its
    audit entry says it; None: it is not. Renewed where its GPUs worked in it (or its work
    goes on while they look idle), or where every GPU has been idle since the term's first
    tick for no longer than `pause_factor` x the longest pause the work came back from; and
    where the work's idleness misled once (`guard_spared`: it resumes work an idle release
    or a declined term ended), whatever its GPUs do. Idle since the term's first tick means
    idle since within a tick and TICK_SLACK of the term's start: a real clock's ticks land
    late (a sleep overshoots), and one that read idle a moment past the tick is no sign of
    work. Where the ticks are not aligned with the term (after a renewal's decision the
    grid restarts a lead before the term's end), GPUs that worked only at a tick in the
    first half tick of the term and sat idle from the next count as idle all of it."""
    if state.idle_since is None:
        return "its GPUs work"
    since = state.idle_since.timestamp()
    if since > term_began + (1 + TICK_SLACK) * settings.tick_seconds:
        return "its GPUs work"
    if state.works_while_idle:
        return "its work goes on while its GPUs look idle"
    if now - since < settings.pause_factor * state.longest_pause_s:
        return "its GPUs idle no longer than a pause its work came back from"
    if state.guard_spared:
        return "it resumes work an idle release or a declined term ended (spared)"
    return None


def _stream_limit(state: MonitorState, policy: IdlePolicy) -> float | None:
    return state.stream_limit_s if policy.release_after is not None else None


def _stretch(state: MonitorState, util: float, seconds: float) -> None:
    """A stretch of the stream ended; past STREAM_STRETCHES the two oldest become one."""
    state.stream.append((util, seconds))
    if len(state.stream) > STREAM_STRETCHES:
        (u0, s0), (u1, s1) = state.stream[:2]
        total = s0 + s1
        state.stream[:2] = [((u0 * s0 + u1 * s1) / total if total > 0 else 0.0, total)]


def _recording(state: MonitorState, policy: IdlePolicy) -> bool:
    """Whether the stream is kept: where the release reads it, and once begun (so that
    `skip`, which knows no policy, and `assess` keep the same stream)."""
    return policy.release_after is not None or state.stretch_since is not None


def _idle_began(state: MonitorState, now: float, started_at: float) -> None:
    """The working stretch under way ended (if any)."""
    if state.stretch_n:
        since = state.stretch_since if state.stretch_since is not None else started_at
        # rounded, so that the readings summed one tick at a time (assess) and n at once
        # (skip) give the stream model the same stretch
        mean = round(state.stretch_util_sum / state.stretch_n, 6)
        _stretch(state, mean, now - since)
    if state.stretch_since is None:
        state.stretch_since = started_at
    state.stretch_util_sum, state.stretch_n = 0.0, 0
    state.stream_limit_s = None


def _ask_stream(state: MonitorState, policy: IdlePolicy) -> None:
    """Once per idle stretch, where no command is known (also when one stops being known
    during it): the stream model's word on when to release."""
    if policy.release_after is None or policy.work != "unknown" or state.stream_limit_s is not None:
        return
    hours = policy.release_after(tuple((u, s / 3600.0) for u, s in state.stream))
    state.stream_limit_s = 3600.0 * hours


def _work_back(state: MonitorState, now: float, started_at: float, mean: float) -> None:
    """A working reading: the idle stretch under way (if any) ended, the working one goes on."""
    if state.idle_since is not None:
        _stretch(state, 0.0, now - state.idle_since.timestamp())
        state.stretch_since, state.stretch_util_sum, state.stretch_n = now, 0.0, 0
        state.stream_limit_s = None
    elif state.stretch_since is None:
        state.stretch_since = started_at
    state.stretch_util_sum += mean
    state.stretch_n += 1


def _pause_over(state: MonitorState, now: float) -> None:
    """The work came back: remember how long the pause was, and that it is over."""
    if state.idle_since is not None:
        state.longest_pause_s = _longest(state.longest_pause_s, state.idle_since, now)
        state.idle_since = None


def _longest(longest_pause_s: float, idle_since: datetime, now: float) -> float:
    """The longest pause, with the one idle since `idle_since` that ends at `now`."""
    return max(longest_pause_s, now - idle_since.timestamp())


def _copy(state: MonitorState) -> MonitorState:
    """A copy whose lists can change without touching `state` (model_copy(deep=True) is
    many times slower, and this runs at every tick)."""
    return state.model_copy(
        update={
            "window": list(state.window),
            "throttled": list(state.throttled),
            "stream": list(state.stream),
        }
    )


@dataclass(frozen=True)
class Assessment:
    state: MonitorState
    events: list[Event] = field(default_factory=list)
    throttle: list[str] = field(default_factory=list)
    release: ReleaseReason | None = None
    mean_util: float | None = None


def assess(
    samples: list[GPUSample],
    prev: MonitorState,
    settings: MonitorSettings,
    now: float,
    started_at: float,
    policy: IdlePolicy = UNKNOWN,
) -> Assessment:
    state = _copy(prev)
    state.ticks += 1
    state.last_tick_at = utc(now)
    events: list[Event] = []
    utils = [s.util_pct for s in samples if s.util_pct is not None]
    mean = sum(utils) / len(utils) if utils else None

    window_s = settings.low_util_window_minutes * 60.0
    if mean is not None:
        state.util_sum += mean
        state.util_n += 1
        state.window = [(t, u) for t, u in state.window if t > now - window_s] + [(now, mean)]
    if state.window and now - started_at >= window_s:
        window_mean = sum(u for _, u in state.window) / len(state.window)
        if window_mean < settings.low_util_pct:
            if not state.low_util_warned:
                state.low_util_warned = True
                events.append(
                    Event(
                        at=utc(now),
                        kind=EventKind.LOW_UTILIZATION,
                        message=f"mean utilisation {window_mean:.1f}% over the last "
                        f"{settings.low_util_window_minutes:g} min is under "
                        f"{settings.low_util_pct:g}%",
                    )
                )
        else:
            state.low_util_warned = False

    release = None
    sick = [s for s in samples if s.health]
    if sick:
        release = ReleaseReason.UNHEALTHY
        events.extend(
            Event(
                at=utc(now),
                kind=EventKind.UNHEALTHY,
                gpu_id=s.gpu_id,
                message=f"{s.health}: the GPU leaves placement and the allocation ends",
            )
            for s in sick
        )
    elif utils and len(utils) == len(samples) and max(utils) < settings.idle_util_pct:
        if state.idle_since is None:
            if _recording(state, policy):
                _idle_began(state, now, started_at)
            state.idle_since = utc(now)
        _ask_stream(state, policy)
        idle_s = now - state.idle_since.timestamp()
        stream = _stream_limit(state, policy)
        limit = idle_limit_s(settings, policy, state.longest_pause_s, stream)
        if idle_s >= limit:
            release = ReleaseReason.IDLE
            events.append(
                Event(
                    at=utc(now),
                    kind=EventKind.IDLE,
                    message=f"every GPU under {settings.idle_util_pct:g}% for {_span(idle_s)}"
                    f"{_holding(samples)}{_why(policy, limit == stream)}",
                )
            )
    elif utils:
        if _recording(state, policy) and mean is not None:
            _work_back(state, now, started_at, mean)
        _pause_over(state, now)

    throttle = []
    for s in samples:
        if (
            s.temp_c is not None
            and s.temp_c > settings.throttle_temp_c
            and s.gpu_id not in state.throttled
        ):
            throttle.append(s.gpu_id)
            state.throttled.append(s.gpu_id)
            events.append(
                Event(
                    at=utc(now),
                    kind=EventKind.THROTTLE,
                    gpu_id=s.gpu_id,
                    message=f"{s.temp_c:.0f} C is over {settings.throttle_temp_c:g} C",
                )
            )
    return Assessment(state, events, throttle, release, mean)


def _why(policy: IdlePolicy, by_stream: bool = False) -> str:
    if policy.work == "done":
        return " after its command exited"
    read = "; released by the model of its utilisation stream" if by_stream else ""
    return f" ({policy.purpose.value}; no command known to run on it{read})"


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _holding(samples: list[GPUSample]) -> str:
    """', 40.2 GiB held by 1 process' where the GPUs report it: an idle GPU with memory held
    is hoarded, not merely forgotten."""
    procs = [p for s in samples for p in (s.processes or [])]
    used = [p.used_gb for p in procs if p.used_gb is not None]
    if not procs:
        return ""
    held = f"{sum(used):.1f} GiB held" if used else "held"
    return f", {held} by {len(procs)} process{'es' if len(procs) > 1 else ''}: hoarded"


OUTSIDE = "in use outside gpu-agent"  # a free GPU that runs processes: never placed


def condition(sample: GPUSample, held: bool, settings: MonitorSettings) -> str:
    """One reading in words: free, busy, underused, idle (memory held: hoarded),
    in use outside gpu-agent, unhealthy or unknown."""
    if sample.health:
        return "unhealthy"
    if not held:
        return OUTSIDE if sample.processes else "free"
    if sample.util_pct is None:
        return "unknown"
    if sample.util_pct >= settings.low_util_pct:
        return "busy"
    if sample.util_pct >= settings.idle_util_pct:
        return "underused"
    return "idle, memory held" if sample.processes else "idle"


# ---- skipping ticks whose readings are known in advance -----------------------------------
#
# A simulated backend knows until when a GPU's readings stay the same. Ticks that would read
# the same values and conclude nothing new need not run one by one: the monitor sleeps to the
# first tick that can conclude something (a warning, an idle release) or that reads new
# values, and `skip` brings its state to where those ticks would have left it. The ticks are
# the same grid (last tick + k x tick_seconds); real backends never promise steady readings,
# so on real GPUs every tick runs.


@dataclass(frozen=True)
class Readings:
    """What `assess` takes from one tick's samples."""

    mean: float | None
    idle: bool | None  # every GPU under the idle threshold; None: no reading


def readings(samples: list[GPUSample], settings: MonitorSettings) -> Readings:
    utils = [s.util_pct for s in samples if s.util_pct is not None]
    if not utils:
        return Readings(None, None)
    idle = len(utils) == len(samples) and max(utils) < settings.idle_util_pct
    return Readings(sum(utils) / len(utils), idle)


def _grid(t0: float, at: float, tick: float) -> float:
    """The first tick t0 + k x tick (k >= 1) at or after `at`."""
    if math.isinf(at):
        return at
    k = max(1, math.ceil((at - t0) / tick - 1e-9))
    return t0 + k * tick


def _transient(settings: MonitorSettings, tick: float) -> int:
    """Ticks after which the window holds only the new readings."""
    return math.ceil(settings.low_util_window_minutes * 60.0 / tick) + 1


def next_tick(
    state: MonitorState,
    last: Readings,
    settings: MonitorSettings,
    tick: float,
    started_at: float,
    steady_until: float,
    policy: IdlePolicy = UNKNOWN,
) -> float:
    """The first tick that can conclude something new, given readings `last` until
    `steady_until` (the last tick's time or earlier: no promise, the very next tick)."""
    assert state.last_tick_at is not None
    t0 = state.last_tick_at.timestamp()
    first = t0 + tick
    if last.mean is None or steady_until <= first:
        return first
    horizon = _grid(t0, steady_until, tick)
    window_s = settings.low_util_window_minutes * 60.0
    times = [t for t, _ in state.window]
    window = [u for _, u in state.window]
    warned = state.low_util_warned
    idle_since = state.idle_since.timestamp() if state.idle_since else None
    longest = state.longest_pause_s
    stream = _stream_limit(state, policy)  # set when the idle stretch under way began
    t = t0
    for k in range(1, _transient(settings, tick) + 1):
        t = t0 + k * tick
        if t >= horizon:
            return horizon
        while times and times[0] <= t - window_s:  # the window's times ascend
            del times[0], window[0]
        times.append(t)
        window.append(last.mean)
        if t - started_at >= window_s:
            if sum(window) / len(window) < settings.low_util_pct:
                if not warned:
                    return t
            else:
                warned = False
        if last.idle:
            idle_since = t if idle_since is None else idle_since
            if t - idle_since >= idle_limit_s(settings, policy, longest, stream):
                return t
        elif idle_since is not None:
            longest, idle_since = max(longest, t - idle_since), None
    at = horizon
    if last.mean < settings.low_util_pct and not warned:
        at = min(at, _grid(t0, max(t + tick, started_at + window_s), tick))
    if last.idle and idle_since is not None:
        limit = idle_limit_s(settings, policy, longest, stream)
        at = min(at, _grid(t0, max(t + tick, idle_since + limit), tick))
    return at


def skip(
    state: MonitorState,
    last: Readings,
    settings: MonitorSettings,
    tick: float,
    started_at: float,
    until: float,
) -> MonitorState:
    """The state after the ticks before `until` that read `last` and concluded nothing new
    (the ticks `next_tick` let the monitor sleep through)."""
    assert state.last_tick_at is not None
    t0 = state.last_tick_at.timestamp()
    n = max(0, math.ceil((until - t0) / tick - 1e-9) - 1)  # ticks strictly before `until`
    if n == 0 or last.mean is None:
        return state
    mean = last.mean
    window_s = settings.low_util_window_minutes * 60.0
    explicit = min(n, _transient(settings, tick))
    # the model's fields in locals: a pydantic attribute write costs many times a local's
    util_sum, window, warned = state.util_sum, state.window, state.low_util_warned
    idle_since, longest = state.idle_since, state.longest_pause_s
    for k in range(1, explicit + 1):
        t = t0 + k * tick
        util_sum += mean
        window = [(x, u) for x, u in window if x > t - window_s] + [(t, mean)]
        if (
            t - started_at >= window_s
            and sum(u for _, u in window) / len(window) >= settings.low_util_pct
        ):
            warned = False
        if last.idle:
            idle_since = idle_since or utc(t)
        elif idle_since is not None:  # the pause is over (_pause_over)
            longest, idle_since = _longest(longest, idle_since, t), None
    rest = n - explicit
    if rest:
        t = t0 + n * tick
        util_sum += rest * mean
        window = [(x, mean) for x in (t - k * tick for k in range(explicit)) if x > t - window_s][
            ::-1
        ]
        if t - started_at >= window_s and mean >= settings.low_util_pct:
            warned = False
    stretch = (  # the working stretch under way goes on (a recorded stream only)
        {"stretch_util_sum": state.stretch_util_sum + n * mean, "stretch_n": state.stretch_n + n}
        if state.stretch_since is not None and not last.idle
        else {}
    )
    return state.model_copy(
        update={
            **stretch,
            "util_sum": util_sum,
            "window": window,
            "low_util_warned": warned,
            "idle_since": idle_since,
            "longest_pause_s": longest,
            "ticks": state.ticks + n,
            "util_n": state.util_n + n,
            "last_tick_at": utc(t0 + n * tick),
            "throttled": list(state.throttled),
        }
    )

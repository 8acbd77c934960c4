"""What one monitoring tick concludes from the readings of an allocation's GPUs.

- low utilisation: the mean over the last `low_util_window_minutes` is under `low_util_pct`
  (a warning, once per low spell);
- idle: every GPU under `idle_util_pct`; idle for `idle_timeout_minutes` means release;
- hot: a GPU over `throttle_temp_c` is throttled (once per allocation).
A reading whose field is unavailable (None) counts neither for nor against a conclusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet.config import MonitorSettings
from fleet.models import Event, EventKind, GPUSample, MonitorState, ReleaseReason, utc


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
) -> Assessment:
    state = prev.model_copy(deep=True)
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
                events.append(Event(
                    at=utc(now), kind=EventKind.LOW_UTILIZATION,
                    message=f"mean utilisation {window_mean:.1f}% over the last "
                    f"{settings.low_util_window_minutes:g} min is under "
                    f"{settings.low_util_pct:g}%",
                ))
        else:
            state.low_util_warned = False

    release = None
    if utils and len(utils) == len(samples) and max(utils) < settings.idle_util_pct:
        if state.idle_since is None:
            state.idle_since = utc(now)
        idle_s = now - state.idle_since.timestamp()
        if idle_s >= settings.idle_timeout_minutes * 60.0:
            release = ReleaseReason.IDLE
            events.append(Event(
                at=utc(now), kind=EventKind.IDLE,
                message=f"every GPU under {settings.idle_util_pct:g}% for {idle_s / 60:.0f} min",
            ))
    elif utils:
        state.idle_since = None

    throttle = []
    for s in samples:
        if s.temp_c is not None and s.temp_c > settings.throttle_temp_c \
                and s.gpu_id not in state.throttled:
            throttle.append(s.gpu_id)
            state.throttled.append(s.gpu_id)
            events.append(Event(
                at=utc(now), kind=EventKind.THROTTLE, gpu_id=s.gpu_id,
                message=f"{s.temp_c:.0f} C is over {settings.throttle_temp_c:g} C: throttled",
            ))
    return Assessment(state, events, throttle, release, mean)

"""One tick's conclusions: low utilisation, idleness, overheating, unavailable fields."""

from __future__ import annotations

from collections.abc import Sequence

from fleet.config import MonitorSettings
from fleet.models import EventKind, GPUSample, MonitorState, Purpose, ReleaseReason, utc
from fleet.monitoring import (
    STREAM_STRETCHES,
    UNKNOWN,
    Assessment,
    IdlePolicy,
    assess,
    idle_limit_s,
)

S = MonitorSettings(
    tick_seconds=60,
    low_util_pct=20,
    low_util_window_minutes=10,
    idle_util_pct=5,
    idle_timeout_minutes=30,
    throttle_temp_c=85,
)
T0 = 1_800_000_000.0


def sample(util: float | None, temp: float | None = 50.0, gpu: str = "g0") -> GPUSample:
    return GPUSample(gpu_id=gpu, at=utc(T0), util_pct=util, temp_c=temp)


def run(
    utils: Sequence[Sequence[float | None]],
    temps: float = 50.0,
    policy: IdlePolicy = UNKNOWN,
    settings: MonitorSettings = S,
) -> list[Assessment]:
    state = MonitorState(last_tick_at=utc(T0))
    results = []
    for i, tick in enumerate(utils, start=1):
        samples = [sample(u, temps, gpu=f"g{j}") for j, u in enumerate(tick)]
        result = assess(samples, state, settings, T0 + 60 * i, T0, policy)
        state = result.state
        results.append(result)
    return results


def test_healthy_training_is_quiet() -> None:
    results = run([[80.0, 85.0]] * 60)
    assert all(not r.events and r.release is None for r in results)
    assert results[-1].state.mean_util == 82.5


def test_low_utilisation_warns_once_after_the_window() -> None:
    results = run([[10.0]] * 30)
    warned = [
        i
        for i, r in enumerate(results)
        if any(e.kind is EventKind.LOW_UTILIZATION for e in r.events)
    ]
    assert warned == [9]  # the 10th minute
    assert all(r.release is None for r in results)  # 10% is low, not idle


def test_idle_is_released_after_the_timeout() -> None:
    results = run([[0.0, 1.0]] * 40)
    released = [i for i, r in enumerate(results) if r.release is ReleaseReason.IDLE]
    assert released[0] == 30  # idle since tick 1, 30 minutes later
    assert any(e.kind is EventKind.IDLE for e in results[30].events)


def test_one_busy_gpu_is_not_idle() -> None:
    results = run([[0.0, 60.0]] * 40)
    assert all(r.release is None for r in results)


def test_activity_resets_idleness() -> None:
    results = run([[0.0]] * 20 + [[50.0]] + [[0.0]] * 20)
    assert all(r.release is None for r in results)


def test_hot_gpu_is_throttled_once() -> None:
    results = run([[90.0]] * 5, temps=88.0)
    assert results[0].throttle == ["g0"]
    assert all(r.throttle == [] for r in results[1:])
    assert any(e.kind is EventKind.THROTTLE for e in results[0].events)


def test_unavailable_fields_never_fail_a_read() -> None:
    results = run([[None]] * 45, temps=None)  # type: ignore[arg-type]
    assert all(r.release is None and not r.events for r in results)
    assert results[-1].state.mean_util is None


def released_at(results) -> list[int]:  # type: ignore[no-untyped-def]
    return [i for i, r in enumerate(results) if r.release is ReleaseReason.IDLE]


def test_a_running_command_pauses_and_is_never_released_for_idling() -> None:
    """Under `gpu-agent run`, idleness is a pause: the lease, budget and exit end it."""
    results = run([[0.0]] * 600, policy=IdlePolicy(Purpose.RESEARCH, "running"))
    assert released_at(results) == []


def test_after_the_command_exits_the_idle_tail_is_released() -> None:
    results = run([[0.0]] * 40, policy=IdlePolicy(Purpose.RESEARCH, "done"))
    assert released_at(results)[0] == 0  # idle_timeout_done_minutes: the first idle tick
    assert "after its command exited" in results[0].events[-1].message
    kept = run(
        [[0.0]] * 40,
        policy=IdlePolicy(Purpose.RESEARCH, "done"),
        settings=MonitorSettings(idle_timeout_done_minutes=5),
    )
    assert released_at(kept)[0] == 5


def test_the_purpose_sets_the_timeout_where_no_command_is_known() -> None:
    settings = S.model_copy(update={"idle_timeout_by_purpose": {Purpose.TRAINING: 60.0}})
    training = run([[0.0]] * 70, policy=IdlePolicy(Purpose.TRAINING), settings=settings)
    research = run([[0.0]] * 70, policy=IdlePolicy(Purpose.RESEARCH), settings=settings)
    assert released_at(training)[0] == 60 and released_at(research)[0] == 30


def test_a_job_that_paused_for_40_minutes_is_not_released_after_30() -> None:
    """Training may idle 45 minutes; it came back from a 40-minute pause, so the next may
    last 1.5 x 40 = 60 minutes. With the default 30, the first pause ends it at 30."""
    settings = S.model_copy(update={"idle_timeout_by_purpose": {Purpose.TRAINING: 45.0}})
    utils = [[80.0]] * 5 + [[0.0]] * 40 + [[80.0]] * 5 + [[0.0]] * 70
    results = run(utils, settings=settings)
    assert results[45].state.longest_pause_s == 40 * 60.0
    assert released_at(results)[0] == 5 + 40 + 5 + 60
    assert released_at(run(utils))[0] == 5 + 30
    assert idle_limit_s(S, IdlePolicy(), 40 * 60.0) == 60 * 60.0


class Model:
    """The stream model as the monitor sees it (IdlePolicy.release_after): what it was asked,
    and hours of idling that depend on the stream read."""

    def __init__(self) -> None:
        self.asked: list[tuple[tuple[float, float], ...]] = []

    def __call__(self, before: tuple[tuple[float, float], ...]) -> float:
        self.asked.append(before)
        return 0.5 if len(before) < 3 else 0.1


def test_the_stream_release_reads_the_stretches_and_releases_when_its_model_says() -> None:
    """Work 31 min, a 20-minute pause (its model says 30 min: kept), work 10 min, idle: the
    model now reads three stretches and says 6 min, where the timeout would wait 30."""
    model = Model()
    utils = [[80.0]] * 30 + [[0.0]] * 20 + [[60.0]] * 10 + [[0.0]] * 40
    results = run(utils, policy=IdlePolicy(release_after=model))
    first, again = ((80.0, 31 / 60),), ((80.0, 31 / 60), (0.0, 20 / 60), (60.0, 10 / 60))
    assert model.asked[:2] == [first, again]
    assert released_at(results)[0] == 60 + 6
    assert "released by the model of its utilisation stream" in results[66].events[-1].message
    assert results[66].state.stream == [(80.0, 31 * 60.0), (0.0, 20 * 60.0), (60.0, 10 * 60.0)]
    assert released_at(run(utils))[0] == 60 + 30  # the timeout


def test_a_guardrail_still_shortens_the_stream_release_and_a_command_keeps_it() -> None:
    def hour(before: tuple[tuple[float, float], ...]) -> float:
        return 1.0

    utils = [[80.0]] * 5 + [[0.0]] * 70
    guarded = run(utils, policy=IdlePolicy(guard_minutes=10, release_after=hour))
    assert released_at(guarded)[0] == 5 + 10
    assert released_at(run(utils, policy=IdlePolicy(release_after=hour)))[0] == 5 + 60
    running = run(utils, policy=IdlePolicy(work="running", release_after=hour))
    assert released_at(running) == []
    # the stream's word replaces the timeout and the pause factor, not a guardrail's
    assert idle_limit_s(S, IdlePolicy(), 40 * 60.0, 600.0) == 600.0
    assert idle_limit_s(S, IdlePolicy(guard_minutes=10), 40 * 60.0, 7200.0) == 60 * 60.0


def test_the_stream_kept_in_the_state_is_bounded_and_keeps_its_time() -> None:
    def hour(before: tuple[tuple[float, float], ...]) -> float:
        return 1.0

    utils = [[50.0], [0.0]] * 100
    state = run(utils, policy=IdlePolicy(release_after=hour))[-1].state
    assert len(state.stream) == STREAM_STRETCHES
    assert sum(s for _, s in state.stream) == 200 * 60.0  # from the start to the last idle
    assert state.stream[-1] == (50.0, 60.0) and state.stream[-2] == (0.0, 60.0)
    assert run(utils)[-1].state.stream == []  # kept only where the release reads it


def test_the_stream_is_asked_once_no_command_is_known_and_not_under_one() -> None:
    """Idle while a command runs: the model is not asked (the command keeps the GPUs);
    with no command known it is asked once in the stretch, and its word replaces the
    timeout; a guardrail's rule, where shorter, decides and the event says so."""
    model = Model()
    utils = [[80.0]] * 5 + [[0.0]] * 40
    assert released_at(run(utils, policy=IdlePolicy(work="running", release_after=model))) == []
    assert model.asked == []
    results = run(utils, policy=IdlePolicy(release_after=model))
    assert len(model.asked) == 1 and released_at(results)[0] == 5 + 30
    guarded = run(utils, policy=IdlePolicy(guard_minutes=10, release_after=model))
    assert released_at(guarded)[0] == 5 + 10
    assert "utilisation stream" not in guarded[15].events[-1].message

"""The clocks: virtual time for concurrent actors, wake tokens, a scaled clock shared by files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fleet.clock import VirtualClock, WallClock, sleep_until
from fleet.config import ClockSettings
from fleet.statedir import clock_for


def test_virtual_sleep_without_actors_advances() -> None:
    clock = VirtualClock(start=100.0)
    clock.sleep(50)
    assert clock.now() == 150.0
    sleep_until(clock, 120.0)  # in the past: no-op
    assert clock.now() == 150.0


def test_actors_interleave_in_time_order() -> None:
    clock = VirtualClock(start=0.0)
    log: list[tuple[float, str]] = []
    lock = threading.Lock()

    def actor(name: str, period: float, n: int) -> None:
        for _ in range(n):
            clock.sleep(period)
            with lock:
                log.append((clock.now(), name))

    with clock.actor():
        threads = [
            clock.spawn(actor, "a", 3.0, 4),
            clock.spawn(actor, "b", 5.0, 3),
            clock.spawn(actor, "c", 1.0, 2, at=10.0),
        ]
    for t in threads:
        t.join(timeout=10)
    times = [t for t, _ in log]
    assert times == sorted(times)
    assert (15.0, "b") in log and (12.0, "a") in log and (12.0, "c") in log
    assert clock.now() == 15.0


def test_time_stands_still_while_an_actor_runs() -> None:
    clock = VirtualClock(start=0.0)
    seen: list[float] = []
    gate = threading.Event()

    def busy() -> None:
        gate.wait(5)
        seen.append(clock.now())

    def sleeper() -> None:
        clock.sleep(100)

    with clock.actor():
        t1 = clock.spawn(busy)
        t2 = clock.spawn(sleeper)
    time.sleep(0.1)
    assert clock.now() == 0.0  # sleeper cannot advance time while busy runs
    gate.set()
    t1.join(5)
    t2.join(5)
    assert seen == [0.0] and clock.now() == 100.0


def test_wake_token_ends_a_virtual_sleep_once() -> None:
    clock = VirtualClock(start=0.0)
    token = clock.token()
    woke_at: list[float] = []

    def sleeper() -> None:
        clock.sleep(1000, token)
        woke_at.append(clock.now())
        clock.sleep(10, token)  # the token was consumed: a full sleep
        woke_at.append(clock.now())

    def waker() -> None:
        clock.sleep(5)
        token.set()

    with clock.actor():
        threads = [clock.spawn(sleeper), clock.spawn(waker)]
    for t in threads:
        t.join(5)
    assert woke_at == [5.0, 15.0]


def test_wall_clock_wake() -> None:
    clock = WallClock()
    token = clock.token()
    threading.Timer(0.05, token.set).start()
    start = time.monotonic()
    clock.sleep(5, token)
    assert time.monotonic() - start < 2


def test_scaled_clock_epoch_is_shared(tmp_path: Path) -> None:
    a = clock_for(tmp_path, ClockSettings(time_scale=60))
    b = clock_for(tmp_path, ClockSettings(time_scale=60))
    assert abs(a.now() - b.now()) < 1.0
    before = a.now()
    time.sleep(0.05)
    assert a.now() - before >= 60 * 0.05 * 0.9

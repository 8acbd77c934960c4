"""One injectable clock: wall time for users, scaled time for demos, virtual time for tests.

Time is a POSIX timestamp (float seconds). Sleeps take an optional WakeToken so that an
explicit release can end a monitor's sleep at once instead of at its next tick.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class WakeToken:
    """Ends a sleep early, once: the sleep it ends clears it. Set from any thread."""

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self._event = threading.Event()
        self._cond = cond

    def set(self) -> None:
        if self._cond is None:
            self._event.set()
            return
        with self._cond:
            self._event.set()
            self._cond.notify_all()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()

    def wait(self, seconds: float) -> bool:
        woken = self._event.wait(seconds)
        self._event.clear()
        return woken


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float, wake: WakeToken | None = None) -> None: ...

    def token(self) -> WakeToken: ...


def sleep_until(clock: Clock, at: float, wake: WakeToken | None = None) -> None:
    delay = at - clock.now()
    if delay > 0:
        clock.sleep(delay, wake)


class WallClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float, wake: WakeToken | None = None) -> None:
        if seconds <= 0:
            return
        if wake is None:
            time.sleep(seconds)
        else:
            wake.wait(seconds)

    def token(self) -> WakeToken:
        return WakeToken()


class ScaledClock(WallClock):
    """Wall time running `scale` times faster from a shared epoch, so separate processes agree."""

    def __init__(self, scale: float, epoch_real: float, epoch_virtual: float) -> None:
        self.scale = scale
        self.epoch_real = epoch_real
        self.epoch_virtual = epoch_virtual

    def now(self) -> float:
        return self.epoch_virtual + (time.time() - self.epoch_real) * self.scale

    def sleep(self, seconds: float, wake: WakeToken | None = None) -> None:
        super().sleep(seconds / self.scale, wake)


class VirtualClock:
    """Discrete-event time shared by several threads ("actors").

    Time stands still while any actor is running and jumps to the earliest wake-up once every
    actor sleeps, so concurrent requests interleave exactly as they would in real time, only
    without the waiting. With no actors registered, a sleep simply advances time.
    """

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = start
        self._cond = threading.Condition()
        self._actors = 0
        self._sleeping = 0
        self._heap: list[tuple[float, int]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def token(self) -> WakeToken:
        return WakeToken(self._cond)

    @contextmanager
    def actor(self) -> Iterator[None]:
        """Count the calling thread as an actor: time stands still until it leaves or sleeps.

        Spawn several actors inside `with clock.actor():` so none runs ahead of the others.
        """
        with self._cond:
            self._actors += 1
        try:
            yield
        finally:
            self._leave()

    def spawn(
        self, fn: Callable[..., Any], *args: Any, at: float | None = None
    ) -> threading.Thread:
        """Run fn in a new actor thread, starting at virtual time `at` (default: now)."""
        with self._cond:
            self._actors += 1  # counted before the thread exists, so time cannot run past `at`

        def run() -> None:
            try:
                if at is not None:
                    sleep_until(self, at)
                fn(*args)
            finally:
                self._leave()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def _leave(self) -> None:
        with self._cond:
            self._actors -= 1
            self._cond.notify_all()

    def sleep(self, seconds: float, wake: WakeToken | None = None) -> None:
        with self._cond:
            if wake is not None and wake.is_set():
                wake.clear()
                return
            if self._actors == 0:
                self._now += max(0.0, seconds)
                return
            entry = (self._now + max(0.0, seconds), next(self._seq))
            heapq.heappush(self._heap, entry)
            self._sleeping += 1
            self._cond.notify_all()  # the earliest sleeper may be waiting for this one
            try:
                while True:
                    if wake is not None and wake.is_set():
                        wake.clear()
                        self._heap.remove(entry)
                        heapq.heapify(self._heap)
                        return
                    if self._sleeping == self._actors and self._heap[0] == entry:
                        heapq.heappop(self._heap)
                        self._now = max(self._now, entry[0])
                        return
                    self._cond.wait()
            finally:
                self._sleeping -= 1
                self._cond.notify_all()

"""Releases heard across processes and hosts at once (PostgreSQL's LISTEN/NOTIFY).

A release that frees GPUs notifies the channel in its own transaction, so every listener hears
it when, and only if, it commits; each process that runs queued requests listens on its own
connection and wakes those that can start now, instead of leaving them to their next poll
(`[scheduler] poll_seconds`, which still runs: a notification lost with a broken connection
costs a poll, never a placement). SQLite has no such channel: its processes poll.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from fleet.sql import Conn

CHANNEL = "gpu_agent_freed"
RECONNECT_S = 1.0  # after a lost connection: the polls cover the gap
log = logging.getLogger(__name__)
# Listeners still open: stopped before the interpreter shuts down, so that no daemon thread is
# inside libpq while it finalises (a process that never closed its services)
_OPEN: weakref.WeakSet[FreedListener] = weakref.WeakSet()


def notify_freed(db: Conn, allocation_id: str) -> None:
    """In the releasing transaction: every listener hears `allocation_id` once it commits."""
    db.execute("SELECT pg_notify(?, ?)", (CHANNEL, allocation_id))


class FreedListener:
    """A thread with its own connection that calls `heard(allocation id)` for every release
    another connection commits (its own process's are heard where they are made)."""

    def __init__(self, url: str, heard: Callable[[str], None], own_pid: Callable[[], int]) -> None:
        self._url, self._heard, self._own_pid = url, heard, own_pid
        self._stop = threading.Event()
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="gpu-agent-listen", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
                    self._conn = conn
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            if note.pid != self._own_pid():
                                self._heard(note.payload)
            except Exception as exc:  # a lost connection or a failed wake-up: polls go on
                if not self._stop.is_set():
                    log.warning("LISTEN %s: %s; again in %g s", CHANNEL, exc, RECONNECT_S)
                    self._stop.wait(RECONNECT_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        _OPEN.discard(self)


@atexit.register
def _close_open() -> None:
    for listener in list(_OPEN):
        listener.close()

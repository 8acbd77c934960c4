"""Many hosts on one PostgreSQL ledger: a release in one process wakes the queued requests of
the others at once (LISTEN/NOTIFY, fleet/ledger/notify.py), not at their next poll, which is an
hour here. With `[scheduler] notify = false` a release notifies nobody and nothing listens;
SQLite has no listener (its processes poll, as before)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from fleet.ledger.notify import CHANNEL
from fleet.models import Status
from graph.orchestrator import Orchestrator
from tests.conftest import small_config

HOLD = {"project": "vision", "gpu_type": "H100", "count": 2, "duration_hours": 1.0}


def listening() -> bool:
    return any(t.name == "gpu-agent-listen" for t in threading.enumerate())


@contextmanager
def pair(tmp_path: Path, database: str, notify: bool) -> Iterator[tuple[Orchestrator, ...]]:
    """Two processes' worth of services (own connections) on one ledger, polling hourly."""
    config = small_config(scheduler={"poll_seconds": 3600, "notify": notify})
    url = database if database.startswith("postgresql") else None  # SQLite: in the state dir
    state = tmp_path / "state"
    with (
        Orchestrator(state, config, database=url) as a,
        Orchestrator(state, config, database=url) as b,
    ):
        yield a, b


def hold(orch: Orchestrator) -> str:
    held = orch.request(HOLD, wait=False)
    assert held.status is Status.ALLOCATED and held.allocation is not None
    return held.allocation.id


def queue(orch: Orchestrator) -> str:
    """A request for the held GPUs, asleep in this orchestrator's queue until its poll."""
    waiting = orch.request(HOLD, wait=False)
    assert waiting.status is Status.QUEUED
    (queued,) = orch.services.ledger.allocations("queued")
    orch.services.waker(queued.id)  # made now, so a release heard before it sleeps is not lost
    orch.continue_in_background(waiting.thread_id)
    return queued.id


def test_a_release_wakes_another_processes_queue_at_once(tmp_path: Path, pg_url: str) -> None:
    with pair(tmp_path, pg_url, notify=True) as (a, b):
        held = hold(a)
        assert listening()  # from the first thread a process runs
        waiting = queue(b)
        a.release(held)
        deadline = time.monotonic() + 30  # the poll is an hour away
        while b.services.ledger.get(waiting).state != "active":
            assert time.monotonic() < deadline, "not woken by the release"
            time.sleep(0.05)
        b.release(waiting)


@pytest.mark.parametrize("notify", [True, False])
def test_a_release_notifies_every_listener_where_asked(
    tmp_path: Path, pg_url: str, notify: bool
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as other, pair(tmp_path, pg_url, notify) as ab:
        other.execute(f"LISTEN {CHANNEL}")
        a, _ = ab
        held = hold(a)
        assert listening() is notify
        a.release(held)
        a.release(held)  # released before: nothing more
        heard = [n.payload for n in other.notifies(timeout=1.0)]
        assert heard == ([held] if notify else [])


def test_sqlite_has_no_listener(tmp_path: Path) -> None:
    with pair(tmp_path, str(tmp_path / "ledger"), notify=True) as (a, _):
        a.release(hold(a))
        assert not listening()

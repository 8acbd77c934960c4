"""Many hosts on one PostgreSQL ledger: a release in one process wakes the queued requests of
the others at once (LISTEN/NOTIFY, fleet/ledger/notify.py), not at their next poll, which is an
hour here; with `[scheduler] notify = false`, and on SQLite, they wait for that poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.models import Status
from graph.orchestrator import Orchestrator
from tests.conftest import small_config

HOLD = {"project": "vision", "gpu_type": "H100", "count": 2, "duration_hours": 1.0}


def listening() -> bool:
    return any(t.name == "gpu-agent-listen" for t in threading.enumerate())


@pytest.fixture
def pair(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Orchestrator, Orchestrator]]:
    """Two processes' worth of services (own connections) on one ledger, polling hourly."""
    notify = getattr(request, "param", True)
    config = small_config(scheduler={"poll_seconds": 3600, "notify": notify})
    where = {"database": database} if database.startswith("postgresql") else {}
    state = tmp_path / "state"
    with Orchestrator(state, config, **where) as a, Orchestrator(state, config, **where) as b:
        yield a, b


def queued_behind(a: Orchestrator, b: Orchestrator) -> tuple[str, str]:
    """A holds both H100s; B's request for them waits in the queue. (A's id, B's id)"""
    held = a.request(HOLD, wait=False)
    assert held.status is Status.ALLOCATED and held.allocation is not None
    waiting = b.request(HOLD, wait=False)
    assert waiting.status is Status.QUEUED
    (queued,) = b.services.ledger.allocations("queued")
    b.services.waker(queued.id)  # made now, so a release heard before B sleeps is not lost
    b.continue_in_background(waiting.thread_id)  # B's queue: asleep until its poll
    return held.allocation.id, queued.id


def state_of(orch: Orchestrator, aid: str) -> str:
    return orch.services.ledger.get(aid).state


def test_a_release_wakes_another_processes_queue_at_once(
    pair: tuple[Orchestrator, Orchestrator], database: str
) -> None:
    a, b = pair
    held, waiting = queued_behind(a, b)
    a.release(held)
    if database.startswith("postgresql"):
        assert listening()
        deadline = time.monotonic() + 30  # the poll is an hour away
        while state_of(b, waiting) != "active":
            assert time.monotonic() < deadline, "not woken by the release"
            time.sleep(0.05)
    else:  # SQLite: no channel, no listener; the queue waits for its poll
        assert not listening()
        time.sleep(2)
        assert state_of(b, waiting) == "queued"
    b.release(waiting)


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
@pytest.mark.parametrize("pair", [False], indirect=True)
def test_with_notify_off_the_queue_waits_for_its_poll(
    pair: tuple[Orchestrator, Orchestrator],
) -> None:
    a, b = pair
    assert not listening()
    held, waiting = queued_behind(a, b)
    a.release(held)
    time.sleep(2)
    assert state_of(b, waiting) == "queued"
    b.release(waiting)

"""The clocks: virtual time for concurrent actors, wake tokens, a scaled clock shared by files."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from fleet.clock import Clock, ScaledClock, VirtualClock, WallClock, sleep_until
from fleet.config import ClockSettings, FleetConfig
from fleet.errors import StateDirError
from fleet.models import Status
from fleet.statedir import CLOCK, LEDGER, clock_of, share_epoch
from graph.orchestrator import Orchestrator
from graph.records import Records
from tests.conftest import small_config


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
    a = clock_of(tmp_path, ClockSettings(time_scale=60))
    share_epoch(tmp_path, a)  # the first opening writes its epoch
    b = clock_of(tmp_path, ClockSettings(time_scale=60))  # a second one reads it
    assert abs(a.now() - b.now()) < 1.0
    before = a.now()
    time.sleep(0.05)
    assert a.now() - before >= 60 * 0.05 * 0.9


def open_clock(state: Path, clocks: list[Clock], errors: list[StateDirError]) -> None:
    """One opening's clock, as open_services makes it: read, then the epoch shared."""
    try:
        clock = clock_of(state, ClockSettings(time_scale=60))
        share_epoch(state, clock)
        clocks.append(clock)
    except StateDirError as exc:
        errors.append(exc)


def test_openings_of_a_new_sped_up_state_dir_at_once_share_one_epoch(tmp_path: Path) -> None:
    """clock.json appears whole: one opening reading it while another writes it never finds
    it empty (which read as corrupt, "delete it")."""
    for i in range(100):
        state = tmp_path / f"s{i}"
        state.mkdir()
        clocks: list[Clock] = []
        errors: list[StateDirError] = []
        threads = [
            threading.Thread(target=open_clock, args=(state, clocks, errors)) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        epochs = {(c.epoch_real, c.epoch_virtual) for c in clocks if isinstance(c, ScaledClock)}
        assert len(epochs) == 1 and sorted(p.name for p in state.iterdir()) == [CLOCK]


# ---- a state directory runs at one time scale (fleet.ledger.time_scale) -----------------------

HELD = {"project": "p", "purpose": "training", "count": 1, "duration_hours": 100}


def scaled(scale: float) -> FleetConfig:
    return small_config(clock={"time_scale": scale})


def placed(state: Path, config: FleetConfig, database: str | None = None) -> str:
    """An allocation held for 100 hours (wall or scaled: its lease outlasts the test)."""
    with Orchestrator(state, config, database=database) as orch:
        out = orch.request(HELD, wait=False)
        assert out.status is Status.ALLOCATED and out.allocation is not None
        return out.allocation.id


def test_a_scaled_state_dir_refuses_the_wall_clock_and_another_scale(tmp_path: Path) -> None:
    state = tmp_path / "s"
    aid = placed(state, scaled(600))
    for config, says in [
        (scaled(1), "ran at time_scale 600, not at time_scale 1 (the wall clock)"),
        (scaled(60), "ran at time_scale 600, not at time_scale 60"),
    ]:
        with pytest.raises(StateDirError) as error:
            Records(state, config)
        assert str(error.value).count("\n") == 0 and says in str(error.value)
        assert "([clock] time_scale = 600)" in str(error.value)
    with Records(state, scaled(600)) as r:  # its own scale: the lease runs on
        assert r.services.ledger.get(aid).state == "active"


def test_a_wall_clock_state_dir_with_allocations_refuses_a_scaled_clock(tmp_path: Path) -> None:
    """Opened sped up, its wall-clock lease would read as long over and be reconciled as
    expired-while-down: refused, and nothing changed."""
    state = tmp_path / "s"
    aid = placed(state, small_config())
    with Records(state, small_config()) as r:
        before = r.services.ledger.dump()
    with pytest.raises(StateDirError, match=r"ran at time_scale 1 \(the wall clock\), not at "):
        Orchestrator(state, scaled(3600))
    assert not (state / CLOCK).exists()  # no epoch left behind either
    with Records(state, small_config()) as r:
        assert r.services.ledger.dump() == before
        assert r.services.ledger.get(aid).state == "active"


def test_a_recorded_scale_binds_an_empty_ledger_too(tmp_path: Path) -> None:
    """A process may run on a ledger that holds nothing yet (a server just started): another
    at another speed would place on it what the first misreads, so it is refused as well."""
    state = tmp_path / "s"
    with Records(state, small_config()) as first:  # still open: a server at the wall clock
        first.set_budget("p", 10_000)
        with pytest.raises(StateDirError, match=r"ran at time_scale 1 \(the wall clock\), not at"):
            Records(state, scaled(3600))
        aid = placed(state, small_config())
    assert not (state / CLOCK).exists()
    with Records(state, small_config()) as r:
        assert r.services.ledger.get(aid).state == "active"


def forget_scale(state: Path) -> None:
    """The ledger as gpu-agent wrote it before it recorded its time scale."""
    db = sqlite3.connect(state / LEDGER)
    with db:
        db.execute("DELETE FROM meta WHERE key='time_scale'")
    db.close()


def test_a_ledger_from_before_with_a_clock_json_takes_its_first_opening_s_scale(
    tmp_path: Path,
) -> None:
    """Before the scale was recorded every opening at another scale wrote a clock.json, a
    read-only command too, so one beside a ledger from then does not say its leases ran sped
    up: the first opening's scale is taken (as it was then), and binds from then on."""
    state = tmp_path / "s"
    aid = placed(state, small_config())
    forget_scale(state)
    (state / CLOCK).write_text(json.dumps({"real": time.time(), "virtual": time.time()}))
    with Records(state, small_config()) as r:  # the wall clock it ran on: not refused
        assert r.services.ledger.get(aid).state == "active"
    with pytest.raises(StateDirError, match=r"ran at time_scale 1 \(the wall clock\), not at"):
        Records(state, scaled(600))


def test_a_ledger_from_before_without_clock_json_ran_on_the_wall_clock(tmp_path: Path) -> None:
    state = tmp_path / "s"
    placed(state, small_config())
    forget_scale(state)
    with pytest.raises(StateDirError, match=r"ran at time_scale 1 \(the wall clock\)"):
        Records(state, scaled(600))
    with Records(state, small_config()):
        pass


def test_every_process_sharing_a_database_agrees_on_the_scale(tmp_path: Path, pg_url: str) -> None:
    """Two hosts' state directories, one PostgreSQL ledger: the scale is the ledger's, so a
    second state directory on the wall clock is refused the first's sped-up ledger."""
    aid = placed(tmp_path / "a", scaled(600), database=pg_url)
    with pytest.raises(StateDirError, match="ran at time_scale 600, not at time_scale 1"):
        Records(tmp_path / "b", small_config(), database=pg_url)
    with Records(tmp_path / "a", scaled(600), database=pg_url) as r:
        assert r.services.ledger.get(aid).state == "active"

"""The release that reads the utilisation stream (council/stream_release.py): its numpy GRU
computes the torch model's chances, it releases at the first tick that reaches its
threshold, its weights round-trip and ship small, and training it is seeded and keeps the
cut budget it was matched to (sim/idle_stream.py, train_release)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from council import stream_release
from council.stream import StreamNet, probabilities
from council.stream_release import (
    MAX_WAIT_HOURS,
    TICK_HOURS,
    WEIGHTS,
    Query,
    Release,
    read,
    save,
    shipped,
)
from council.weightfiles import write_arrays
from fleet.clock import VirtualClock
from fleet.config import MonitorSettings
from fleet.errors import ConfigError
from fleet.models import Purpose
from graph.orchestrator import Orchestrator
from sim.idle_stream import episodes, fleet_rule, judge, split, train_release
from sim.workload import Phase, SimJob
from tests.conftest import small_config


def _net(seed: int = 3) -> StreamNet:
    net = StreamNet("gru", seed)
    with torch.no_grad():  # biases away from their zero start, so that they are checked too
        gen = torch.Generator().manual_seed(seed)
        net.core.b.add_(torch.randn(net.core.b.shape, generator=gen))  # type: ignore[union-attr]
        net.head.bias.add_(0.3)
    return net.eval()


def _state(net: StreamNet) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def _stream(rng: random.Random) -> tuple[tuple[float, float], ...]:
    out = []
    for k in range(rng.randint(0, 9)):
        out.append((0.0 if k % 2 else rng.uniform(10, 95), rng.lognormvariate(-1, 1.2)))
    return tuple(out)


def test_the_numpy_gru_computes_the_torch_models_chances() -> None:
    net = _net()
    release = Release(_state(net), 0.5)
    rng = random.Random(0)
    for _ in range(25):
        before, lease = _stream(rng), rng.uniform(0.5, 48)
        got = release.chances(before, lease)
        want = probabilities(net, [Query(before, t, lease) for t in release.ticks])
        assert np.allclose(got, want, atol=2e-6), (before, lease)
    assert len(release.ticks) == round(MAX_WAIT_HOURS / TICK_HOURS)


def test_it_releases_at_the_first_tick_whose_chance_reaches_the_threshold() -> None:
    net = _net()
    before, lease = ((80.0, 2.0), (0.0, 0.4), (60.0, 1.0)), 8.0
    p = Release(_state(net), 0.5).chances(before, lease)
    for threshold in (float(p.min()), float(np.median(p)), float(p.max())):
        got = Release(_state(net), threshold).after(before, lease)
        first = next(i for i, x in enumerate(p) if x >= threshold)
        assert got == pytest.approx((first + 1) * TICK_HOURS)
    assert Release(_state(net), 1.0).after(before, lease) == MAX_WAIT_HOURS or p.max() >= 1.0


def test_bad_thresholds_and_leases_are_refused() -> None:
    state = _state(_net())
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            Release(state, bad)
    with pytest.raises(ValueError, match="lease"):
        Release(state, 0.5).after((), 0.0)


def test_weights_that_would_not_load_are_not_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threshold"):
        save(tmp_path / "s.npz", _state(_net()), 0.0, {})
    assert not (tmp_path / "s.npz").exists()


def test_the_weights_round_trip_and_the_shipped_ones_are_small(tmp_path: Path) -> None:
    net = _net()
    path = tmp_path / "stream.npz"
    save(path, _state(net), 0.7, {"trained_on": "test"})
    first = path.read_bytes()
    save(path, _state(net), 0.7, {"trained_on": "test"})
    assert path.read_bytes() == first  # the same weights, the same bytes
    header, state = read(path)
    assert header == {"threshold": 0.7, "meta": {"trained_on": "test"}}
    assert all(np.array_equal(state[k], _state(net)[k]) for k in state)
    assert WEIGHTS.stat().st_size < 1 << 20
    model = shipped()
    assert 0 < model.threshold <= 1 and model.hidden == 16
    header, _ = read(WEIGHTS)
    assert "fleet rule" in header["meta"]["test"] and "trained_on" in header["meta"]


def _jobs() -> list[SimJob]:
    rng = random.Random(7)
    out = []
    for i in range(240):
        phases = []
        for _ in range(rng.randint(1, 3)):
            phases += [Phase(rng.uniform(0.5, 3), rng.uniform(40, 90)), Phase(0.0, 0.0)]
            phases[-1] = Phase(rng.lognormvariate(-1.5, 1.0), 0.0)
        phases.append(Phase(rng.uniform(0.1, 4), 0.0))  # the tail
        work = sum(p.hours for p in phases if p.work)
        out.append(
            SimJob(
                id=i,
                project="p",
                submit=1_767_225_600.0 + i * 3600.0,
                count=rng.choice((1, 2, 8)),
                purpose=Purpose.TRAINING,
                named_type=None,
                reference="A100",
                requested_hours=2 * work,
                pad=2.0,
                phases=tuple(phases),
            )
        )
    return out


def test_training_is_seeded_and_keeps_the_fleet_rules_cut_budget() -> None:
    jobs, settings = _jobs(), MonitorSettings(idle_timeout_minutes=30)
    state, threshold, figures = train_release(jobs, settings, seed=1, steps=40)
    again = train_release(jobs, settings, seed=1, steps=40)
    assert threshold == again[1] and figures == again[2]
    assert all(np.array_equal(state[k], again[0][k]) for k in state)
    _, val, _ = split(episodes(jobs))
    allowed = judge(val, fleet_rule(val, settings)).cut
    assert figures["validation_cuts_allowed"] == allowed
    release = Release(state, threshold)
    cuts = sum(
        not e.ended and release.after(e.query.before, e.query.lease_hours) < e.hours for e in val
    )
    assert cuts <= allowed


@pytest.fixture
def damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The shipped weights' place holding a file the model cannot be read from."""
    path = tmp_path / "stream.npz"
    path.write_bytes(b"not an archive")
    monkeypatch.setattr(stream_release, "WEIGHTS", path)
    shipped.cache_clear()
    yield path
    shipped.cache_clear()


def test_weights_that_cannot_answer_are_one_line_at_start_up(damaged: Path, tmp_path: Path) -> None:
    """A missing, damaged or misshapen file fails where the services start (the
    Orchestrator, the simulator, the server), in one line, not at a monitor's tick."""
    with pytest.raises(ConfigError, match="cannot load the stream release model") as got:
        shipped()
    assert "\n" not in str(got.value) and str(damaged) in str(got.value)
    with pytest.raises(ConfigError):
        shipped(tmp_path / "missing.npz")
    header, state = read(WEIGHTS)  # the real file (the name imported before the patch)
    misshapen = tmp_path / "misshapen.npz"
    write_arrays(
        misshapen,
        {"header": np.array(json.dumps(header))}
        | {f"state/{k}": v[..., :2] for k, v in state.items()},
    )
    with pytest.raises(ConfigError):
        shipped(misshapen)
    stream = small_config()
    stream = stream.model_copy(
        update={"monitor": stream.monitor.model_copy(update={"idle_release": "stream"})}
    )
    with pytest.raises(ConfigError, match="stream release model"):
        Orchestrator(tmp_path / "state", stream, clock=VirtualClock())
    guard = small_config(council={"guard_share": 0.5, "guard_idle_release": "stream"})
    with pytest.raises(ConfigError, match="stream release model"):  # the guardrail reads it too
        Orchestrator(tmp_path / "state", guard, clock=VirtualClock())
    # a fleet that does not ask for the stream starts: it never reads the damaged file
    with Orchestrator(tmp_path / "state", small_config(), clock=VirtualClock()) as orch:
        assert orch.services.config.monitor.idle_release == "timeout"

"""The CfC cell and the council network: batching, time, validation, monotonicity."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from council.cfc import CfC
from council.encoding import (
    SEQ_BAD,
    SEQ_BAD_V1,
    SEQ_FREE,
    SEQ_FREE_V1,
    Encoded,
    encode,
    encode_arrays,
)
from council.features import RequestFeatures
from council.record import PastJob
from council.spec import NetSpec
from council.torch_net import CouncilNet
from fleet.errors import InvalidInput
from fleet.models import ReleaseReason

NOW = 1.8e9
REASONS = [
    ReleaseReason.EXPLICIT,
    ReleaseReason.IDLE,
    ReleaseReason.BUDGET,
    ReleaseReason.LEASE_EXPIRED,
]


def history(
    rng: random.Random, n: int, util: float | None = None, bad: float = 0.2
) -> tuple[PastJob, ...]:
    t, jobs = NOW - 60 * 86400, []
    for _ in range(n):
        t += rng.expovariate(1.0) * 86400
        reason = rng.choice(REASONS[1:3]) if rng.random() < bad else ReleaseReason.EXPLICIT
        hours = rng.uniform(0.2, 30)
        jobs.append(
            PastJob(
                t,
                rng.choice((1, 2, 4, 8)),
                hours,
                rng.uniform(1, 900),
                util if util is not None else (None if rng.random() < 0.1 else rng.uniform(0, 100)),
                reason,
                rng.random(),  # released for idling: idle throughout
                hoarded_hours=hours if reason is ReleaseReason.IDLE else 0.0,
            )
        )
    return tuple(jobs)


def features(rng: random.Random, n: int | None = None, **kw: object) -> RequestFeatures:
    past = history(rng, rng.randint(0, 40) if n is None else n)
    base = RequestFeatures(
        count=rng.choice((2, 4, 8)),
        hours=rng.uniform(1, 48),
        priority=0.5,
        worst_case_usd=rng.uniform(10, 3000),
        cost_pressure=rng.uniform(0, 3),
        budgeted=True,
        usage_share=rng.random(),
        fair_share=rng.random(),
        pool_share=rng.random(),
        pool_busy=rng.random(),
        hoarding_rate=0.0,
        overrun_rate=0.0,
        recent_util=50.0,
        history_len=len(past),
        purpose_mismatch=0.0,
        past=past,
        now=NOW,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


SPEC = NetSpec.current(
    members=("cost", "risk", "general"),
    perspectives=("cost", "risk", "general"),
    modes=("default", "default", "no_gate"),
    seed=3,
)


def test_batched_output_equals_per_sample_output() -> None:
    rng = random.Random(0)
    batch = [features(rng, n) for n in (0, 3, 17, 32)]
    net = CouncilNet(SPEC).eval()
    with torch.no_grad():
        together = net(encode(batch)).logit
        alone = torch.cat([net(encode([f])).logit for f in batch], dim=1)
    assert torch.allclose(together, alone, atol=1e-5)
    assert together.shape == (3, 4)


def test_negative_time_steps_and_unsorted_times_are_rejected() -> None:
    cell = CfC(1, 2, 4, 8, ("default",), seed=0)
    x, mask = torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="negative"):
        cell(x, torch.tensor([[0.0, 1.0, -0.5]]), mask)
    with pytest.raises(ValueError, match="finite"):
        cell(x, torch.tensor([[0.0, float("nan"), 1.0]]), mask)
    rng = random.Random(1)
    f = features(rng, 5)
    with pytest.raises(InvalidInput, match="time order"):
        encode([dataclasses.replace(f, past=tuple(reversed(f.past)))])
    with pytest.raises(InvalidInput, match="time order"):  # a request judged before its history
        encode([dataclasses.replace(f, now=f.past[-1].ended_at - 1)])


def test_dt_is_in_days_and_not_capped_and_first_weights_read_their_inputs() -> None:
    """dt reaches the network as it is (a record fades as it ages, however old); weights
    trained on the first inputs (a spec that names none: NetSpec's defaults) read their
    columns alone."""
    rng = random.Random(5)
    f = features(
        rng,
        0,
        past=(
            PastJob(NOW - 500 * 86400, 1, 1, 1, 50, ReleaseReason.IDLE, hoarded_hours=1),
            PastJob(NOW - 86400, 1, 1, 1, 12.5, ReleaseReason.EXPLICIT, lease_hours=4),
        ),
    )
    enc = encode([f, features(rng, 5)])
    assert enc.dt[0, -3:].tolist() == [0.0, 499.0, 1.0]
    assert enc.mask[0].tolist() == [False] * 3 + [True] * 3  # left-padded to the longer one
    # held idle, stopped by the budget, utilisation deficit, under the waste line, held on
    # until the monitor (or the lease, or the budget) ended it
    assert enc.bad[0, -3:].tolist() == [
        [1.0, 0.0, 0.5, 0.0, 1.0],
        [0.0, 0.0, 0.875, 1.0, 0.0],
        [0.0] * 5,
    ]
    holder, used = SEQ_FREE.index("by_holder"), SEQ_FREE.index("lease_used")
    assert enc.free[0, -3:, holder].tolist() == [0.0, 1.0, 0.0]
    assert enc.free[0, -3:, used].tolist() == [1.0, 0.25, 0.0]  # unknown lease: used whole
    first = NetSpec(members=("risk",), perspectives=("risk",), modes=("default",))
    read = first.read(enc)
    assert torch.equal(read.dt, enc.dt)
    assert read.free.shape[-1] == len(SEQ_FREE_V1) and read.bad.shape[-1] == len(SEQ_BAD_V1)
    assert torch.equal(read.bad, enc.bad[..., : len(SEQ_BAD_V1)])
    # a council trained now reads every input but whether its holder released it, which it
    # reads as the monotone held_on instead
    now = SPEC.read(enc)
    kept = [i for i, name in enumerate(SEQ_FREE) if name != "by_holder"]
    assert torch.equal(now.free, enc.free[..., kept]) and torch.equal(now.bad, enc.bad)


def test_years_long_gaps_stay_finite() -> None:
    """A record ten thousand days old: the time gates and the evidence decay saturate
    without overflow, torch and numpy alike, and the record is forgotten."""
    from council.inference import NumpyCouncilNet

    rng = random.Random(8)
    net = CouncilNet(SPEC).eval()
    numpy_net = NumpyCouncilNet(SPEC, {k: v.numpy() for k, v in net.state_dict().items()})
    f = features(rng, 12)
    ages = (0.0, 1e2, 1e4)  # days between the newest allocation and the request
    batch = [dataclasses.replace(f, now=f.past[-1].ended_at + a * 86400) for a in ages]
    with torch.no_grad():
        out = net(encode(batch), trace=True)
    assert all(bool(torch.isfinite(t).all()) for t in (out.logit, out.rates))
    assert out.trace is not None and bool(torch.isfinite(out.trace.hidden).all())
    logits = numpy_net.logits(encode_arrays(batch))
    assert bool(np.isfinite(logits).all())
    assert np.abs(logits - out.logit.double().numpy()).max() < 1e-4
    # the evidence of the record decays away: the rates reach their prior's
    forgotten = torch.nn.functional.softplus(net.prior_num) / torch.nn.functional.softplus(
        net.prior_den
    )
    assert bool((out.rates[:, 2] <= forgotten[:, 0] + 1e-6).all())


def test_gates_and_time_constants_are_exposed_and_time_moves_them() -> None:
    rng = random.Random(2)
    f = features(rng, 10)
    net = CouncilNet(SPEC).eval()
    enc = encode([f])
    with torch.no_grad():
        out = net(enc, trace=True)
        slower = dataclasses.replace(enc, dt=enc.dt * 10)
        out10 = net(slower, trace=True)
    assert out.trace is not None and out10.trace is not None
    steps = enc.dt.shape[1]
    assert out.trace.gate.shape == (3, 1, steps, SPEC.hidden)
    assert bool(((out.trace.gate >= 0) & (out.trace.gate <= 1)).all())
    assert bool((out.trace.time_constant > 0).all())
    assert out.decay is not None and out.decay.shape == (3, 1, steps, SPEC.channels)
    assert not torch.allclose(out.trace.gate, out10.trace.gate)  # dt enters the gate
    assert not torch.allclose(out.logit, out10.logit)


def test_no_gate_variant_and_seeds() -> None:
    rng = random.Random(4)
    enc = encode([features(rng, 8)])
    a, b = CouncilNet(SPEC), CouncilNet(SPEC)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    gated = CouncilNet(dataclasses.replace(SPEC, modes=("default",) * 3))
    with torch.no_grad():
        assert torch.equal(a(enc).logit, b(enc).logit)
        assert torch.equal(a(enc).logit[:2], gated(enc).logit[:2])
        assert not torch.equal(a(enc).logit[2], gated(enc).logit[2])
    other = CouncilNet(dataclasses.replace(SPEC, seed=4))
    with torch.no_grad():
        assert not torch.equal(a(enc).logit, other(enc).logit)


def _worse(enc: Encoded[torch.Tensor], column: str, rows: torch.Tensor) -> Encoded[torch.Tensor]:
    out = enc.take(torch.arange(len(enc)))
    col = SEQ_BAD.index(column)
    out.bad[:, :, col] = torch.maximum(out.bad[:, :, col], rows)
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    net_seed=st.integers(0, 50),
    column=st.sampled_from(SEQ_BAD),
    amount=st.floats(0, 1),
)
def test_monotone_by_construction_for_any_weights(
    seed: int, net_seed: int, column: str, amount: float
) -> None:
    """Untrained nets with random weights: a worse record or more cost pressure never raises
    any member's approval logit. This holds for whatever weights training finds."""
    rng = random.Random(seed)
    net = CouncilNet(dataclasses.replace(SPEC, seed=net_seed)).eval()
    with torch.no_grad():
        for p in net.parameters():  # move far from the initialisation
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(net_seed)))
    enc = encode([features(rng, n) for n in (1, 9, 32)])
    bump = torch.rand(enc.bad.shape[:2], generator=torch.Generator().manual_seed(seed)) * amount
    worse = _worse(enc, column, bump * enc.mask)
    pricier = enc.take(torch.arange(len(enc)))
    pricier.static_bad += amount
    with torch.no_grad():
        base = net(enc).logit
        assert bool((net(worse).logit <= base + 1e-5).all())
        assert bool((net(pricier).logit <= base + 1e-5).all())


def test_occlusions_share_one_core_pass() -> None:
    """decide() runs the recurrent core once for a request and all its occluded variants."""
    from council.neural_council import with_occlusions

    rng = random.Random(6)
    enc = with_occlusions(encode([features(rng, 20)]))
    net = CouncilNet(SPEC).eval()
    with torch.no_grad():
        assert torch.allclose(net(enc).logit, net(enc, rows=len(enc)).logit, atol=1e-5)

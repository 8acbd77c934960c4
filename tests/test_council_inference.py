"""The torch-free decision path: council.npz holds council.pt's tensors, and the numpy forward
(council/inference.py) gives the torch model's logits, votes, reasons and outcomes."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from council.dataset import World, synthetic_jobs
from council.encoding import Encoded, _raw, _rows_one, encode, encode_arrays
from council.features import RequestFeatures
from council.inference import NumpyCouncilNet, sigmoid
from council.neural_council import OCCLUSIONS, SHIPPED, NeuralCouncil, with_occlusions
from council.spec import NetSpec
from council.torch_net import CouncilNet
from council.weightfiles import arrays_path
from fleet.config import CouncilSettings, load_fleet
from fleet.errors import InvalidInput
from tests.test_council_cfc import SPEC, features

SETTINGS = CouncilSettings()
ROWS = 1 + len(OCCLUSIONS)


@pytest.fixture(scope="module")
def council() -> NeuralCouncil:
    return NeuralCouncil.load()


@pytest.fixture(scope="module")
def batch() -> list[RequestFeatures]:
    """Requests replayed as the training data is (a world no training used), and random
    shapes: empty to long histories, unrated jobs, every release reason."""
    samples = World(synthetic_jobs(9003, 20, 12), load_fleet(None), 9003, 9003).run()
    rng = random.Random(3)
    return [s.features for s in samples] + [features(rng) for _ in range(60)]


def exact(net: CouncilNet) -> CouncilNet:
    """The torch model in float64: its float32 arithmetic moves a probability by up to 1e-6 on
    such requests (council/inference.py), so only float64 shows the two agree exactly."""
    return copy.deepcopy(net).double()


def double(enc: Encoded[torch.Tensor]) -> Encoded[torch.Tensor]:
    return Encoded(
        *(
            t.double() if t.is_floating_point() else t
            for t in (enc.free, enc.bad, enc.dt, enc.mask, enc.static_free, enc.static_bad)
        )
    )


def same(a: Any, b: Any, tol: float) -> bool:
    """Equal, but for floats within `tol` (decisions as model_dump() dicts)."""
    if isinstance(a, float):
        return isinstance(b, float) and abs(a - b) <= tol
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(same(x, y, tol) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


def test_the_npz_holds_the_pts_tensors_and_vote() -> None:
    blob = torch.load(SHIPPED, weights_only=True)
    with np.load(arrays_path(SHIPPED), allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        state = {k.removeprefix("state/"): z[k] for k in z.files if k != "header"}
    assert list(state) == list(blob["state"])
    for name, tensor in blob["state"].items():
        assert state[name].dtype == tensor.numpy().dtype, name
        assert np.array_equal(state[name], tensor.numpy()), name
    assert NetSpec.from_dict(header["spec"]) == NetSpec.from_dict(blob["spec"])
    assert header["temperature"] == blob["temperature"]
    assert header["vote_weights"] == blob["vote_weights"] and header["meta"] == blob["meta"]
    assert header["pt_sha256"] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()


def test_numpy_logits_are_the_torch_models(
    council: NeuralCouncil, batch: list[RequestFeatures]
) -> None:
    ours = council.model.logits(encode_arrays(batch))
    enc = encode(batch)
    with torch.no_grad():
        in_float64 = exact(council.net)(double(enc)).logit.numpy()
        in_float32 = council.net(enc).logit.double().numpy()
    assert ours.shape == (len(council.members), len(batch))
    assert np.abs(ours - in_float64).max() < 1e-9
    assert np.abs(sigmoid(ours) - sigmoid(in_float32)).max() < 1e-5


def test_one_request_is_encoded_as_in_a_batch(batch: list[RequestFeatures]) -> None:
    """encode_arrays encodes one request step by step in Python and a batch column by column
    in numpy: the same arrays, bit for bit (summaries of older history, unrated, zero-hour
    and lease-less jobs included), and the same refusal of a history out of time order."""
    one_step = dataclasses.replace(batch[0], past=(), older=None)  # pads nothing beside it
    odd = [
        dataclasses.replace(f, past=(dataclasses.replace(f.past[0], **change), *f.past[1:]))
        for f in batch
        if f.past
        for change in ({"hours": 0.0}, {"lease_hours": 0.0}, {"util_pct": None})
    ][::7]
    assert any(f.older is not None for f in batch) and odd
    for f in [*batch, *odd]:
        rows = np.array(_rows_one(f))  # the steps before float32, too
        assert rows.tobytes() == _raw([f, one_step])[0][: len(rows)].tobytes()
        alone, together = encode_arrays([f]), encode_arrays([f, one_step]).take([0])
        for name in ("free", "bad", "dt", "mask", "static_free", "static_bad"):
            a, b = getattr(alone, name), getattr(together, name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    f = next(f for f in batch if len(f.past) > 2)
    unsorted = dataclasses.replace(f, past=(f.past[1], f.past[0], *f.past[2:]))
    errors = []
    for encoding in ([unsorted], [unsorted, one_step]):
        with pytest.raises(InvalidInput, match="time order") as raised:
            encode_arrays(encoding)
        errors.append(str(raised.value))
    assert errors[0] == errors[1]


# The shipped council's probabilities for requests 0, 1, 2, 3, 5, 8, 13 and 21 of PINNED_BATCH,
# one tuple per request, one entry per member: computed before the batched forward was made
# fast (at b058383), by the float64 numpy forward. The float32 torch forward of that time was
# off by up to 4.4e-5 here (it summed the evidence decay as a total less a running sum).
PINNED = {
    0: (0.863573147, 0.866492564, 0.248658137, 0.752207248, 0.656621013, 0.662158937),
    1: (0.000662720, 0.683725279, 0.795089787, 0.726422149, 0.523827887, 0.498595038),
    2: (0.011006392, 0.708316552, 0.672177704, 0.845928406, 0.652165194, 0.695110837),
    3: (0.000342353, 0.206094548, 0.457315432, 0.751851370, 0.322629740, 0.330374711),
    5: (0.237245317, 0.856676239, 0.044804046, 0.720878333, 0.503361014, 0.464539467),
    8: (0.000001987, 0.523786033, 0.095150042, 0.658488164, 0.310277103, 0.272071957),
    13: (0.000102611, 0.639242480, 0.081664082, 0.776131098, 0.456755640, 0.483583980),
    21: (0.000002694, 0.535907410, 0.068306472, 0.717047297, 0.245755995, 0.233536008),
}


def pinned_batch() -> list[RequestFeatures]:
    """64 requests with 0 to 40 past events: one batch pads most of them."""
    rng = random.Random(11)
    return [features(rng) for _ in range(64)]


def test_a_padded_batch_gives_the_pinned_probabilities(council: NeuralCouncil) -> None:
    """The torch model's float32 forward of a padded batch and the numpy one give the
    probabilities pinned before the batched forward was rewritten."""
    batch = pinned_batch()
    batched = council.probabilities(batch).numpy()
    exact_p = sigmoid(council.model.logits(encode_arrays(batch)))
    for i, expected in PINNED.items():
        assert np.abs(batched[:, i] - expected).max() < 1e-5, i
        assert np.abs(exact_p[:, i] - expected).max() < 1e-9, i
    assert np.abs(batched - exact_p).max() < 1e-5
    alone = council.probabilities(batch[:1]).numpy()  # no padding: the same probabilities
    assert np.abs(alone[:, 0] - batched[:, 0]).max() < 1e-5


def test_decisions_and_reasons_are_the_torch_models(
    council: NeuralCouncil, batch: list[RequestFeatures]
) -> None:
    """decide() against the same decision built from the torch model's logits for the request
    and its occluded variants: the same outcomes, votes, verdicts and reasons."""
    net64 = exact(council.net)
    outcomes = set()
    for f in batch:
        ours = council.decide(f, SETTINGS).model_dump()
        enc = with_occlusions(encode([f]))
        with torch.no_grad():
            in_float64 = net64(double(enc), rows=ROWS).logit.numpy()
        in_float32 = council.member_logits(enc, occlusions=True).double().numpy()
        assert same(ours, council.decision(f, in_float64, SETTINGS).model_dump(), 1e-9)
        assert same(ours, council.decision(f, in_float32, SETTINGS).model_dump(), 1e-3)
        outcomes.add(ours["outcome"])
    assert outcomes == {"approved", "denied", "split"}  # the batch reaches every outcome


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"time": "none"},
        {"time": "input"},
        {"core": "gru", "time": "input"},
        {"activation": "lecun_tanh"},
    ],
    ids=str,
)
def test_every_network_variant_matches(change: dict[str, str]) -> None:
    """Untrained nets moved away from their initialisation (not so far that the recurrence
    turns chaotic and amplifies rounding), with a no_gate member (SPEC): the forward is
    CouncilNet's for every spec a weights file can hold, occlusion rows included."""
    net = CouncilNet(dataclasses.replace(SPEC, **change)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    model = NeuralCouncil.of(net, 1.0, (1.0,) * 3, "test").model
    rng = random.Random(8)
    batch = [features(rng, n) for n in (0, 1, 9, 32)]
    one = [features(rng, 12)]
    with torch.no_grad():
        whole = exact(net)(double(encode(batch))).logit.numpy()
        occluded = exact(net)(double(with_occlusions(encode(one))), rows=ROWS).logit.numpy()
    assert np.abs(model.logits(encode_arrays(batch)) - whole).max() < 1e-9
    assert (
        np.abs(model.logits(with_occlusions(encode_arrays(one)), rows=ROWS) - occluded).max() < 1e-9
    )


def test_bad_times_fail_as_in_the_torch_model(council: NeuralCouncil) -> None:
    f = dataclasses.replace(features(random.Random(2), 4), now=math.nan)
    with pytest.raises(ValueError, match="finite"):
        council.member_logits(encode([f]))
    with pytest.raises(ValueError, match="finite"):
        council.decide(f, SETTINGS)


def test_a_pt_without_its_own_npz_is_read_through_torch(
    council: NeuralCouncil, tmp_path: Path
) -> None:
    """Weights trained before council.npz existed, or a council.pt replaced on its own."""
    shutil.copy(SHIPPED, tmp_path / "council.pt")
    alone = NeuralCouncil.load(tmp_path / "council.pt")
    assert alone.name == council.name
    assert all(np.array_equal(alone.model.state[k], v) for k, v in council.model.state.items())

    state = {k: v * 2 if v.dtype == np.float32 else v for k, v in council.model.state.items()}
    other = NeuralCouncil(NumpyCouncilNet(council.model.spec, state), 0.5, (1.0,) * 6, "x")
    other.save(tmp_path / "other.pt")
    shutil.copy(arrays_path(SHIPPED), tmp_path / "other.npz")  # the shipped arrays beside it
    loaded = NeuralCouncil.load(tmp_path / "other.pt")
    assert loaded.temperature == 0.5
    assert all(np.array_equal(loaded.model.state[k], v) for k, v in state.items())

"""The neural council: trained CfC members, one batched pass, calibrated soft vote, reasons.

Reasons come from occlusion: each vote is recomputed with one feature group set to a neutral
value (no hoarding, no overruns, 50 % utilisation, no cost pressure, a fresh project's fair
share, an empty pool, normal priority); the change in the member's logit is that group's
effect. All variants run in the same batched pass as the vote itself.

A decision runs the numpy forward (council/inference.py) on the weights council.npz holds, so
deciding never imports torch; the torch model (`net`), the tensor methods and `save` import it
when first used.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from council import weightfiles
from council.encoding import (
    SEQ_BAD,
    SEQ_FREE,
    STATIC_BAD,
    STATIC_FREE,
    A,
    Encoded,
    encode,
    encode_arrays,
)
from council.features import RequestFeatures
from council.inference import NumpyCouncilNet, sigmoid
from council.rules import describe
from council.spec import NetSpec
from council.voting import combine, gpu_hours_asked
from fleet.config import CouncilSettings
from fleet.errors import ConfigError
from fleet.models import CouncilDecision, MemberVote, Reason, Verdict

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from torch import Tensor

    from council.torch_net import CouncilNet

SHIPPED = Path(__file__).parent / "weights" / "council.pt"
# the shipped council trained on outcomes (`gpu-agent council train --target outcome --seed
# 0`), opt-in: a fleet file's `[council] weights = "outcome"` (its card: weights/outcome/)
SHIPPED_OUTCOME = SHIPPED.parent / "outcome" / SHIPPED.name
SHIPPED_NAMES = {"outcome": SHIPPED_OUTCOME}
ABSTAIN_MARGIN = 0.05
TOP_REASONS = 3


Occlusion = Callable[[Encoded[Any], int], None]  # neutralises one group in row i, in place


def _static(group: str, name: str, value: float) -> Occlusion:
    col = (STATIC_FREE if group == "static_free" else STATIC_BAD).index(name)

    def apply(e: Encoded[Any], i: int) -> None:
        getattr(e, group)[i, col] = value

    return apply


def _record(**values: float) -> Occlusion:
    """Each named `bad` column of the record set to its value where utilisation is known."""
    cols = {SEQ_BAD.index(name): value for name, value in values.items()}
    rated = SEQ_FREE.index("rated")

    def apply(e: Encoded[Any], i: int) -> None:
        for col, value in cols.items():
            e.bad[i, :, col] = value * e.free[i, :, rated]

    return apply


# keyed by the reference feature whose wording describes the group
OCCLUSIONS: dict[str, Occlusion] = {
    "cost_pressure": _static("static_bad", "cost_pressure", 0.0),
    "purpose_mismatch": _static("static_bad", "purpose_mismatch", 0.0),
    "fair_share": _static("static_bad", "unfair_share", 0.0),
    "pool_share": _static("static_bad", "pool_share", 0.0),
    "pool_busy": _static("static_bad", "pool_busy", 0.0),
    "priority": _static("static_free", "priority", 0.5),
    "hoarding_rate": _record(hoarded_share=0.0),
    "overrun_rate": _record(budget_release=0.0),
    "recent_util": _record(util_deficit=0.5, low_util=0.0),  # 50 %: not under the waste line
}


def with_occlusions(enc: Encoded[A]) -> Encoded[A]:
    """Row 0: the request as it is; row 1 + i: with OCCLUSIONS[i] neutralised. Occlusions
    touch only `bad` and static inputs, never what the recurrent core reads."""
    rows = enc.take([0] * (1 + len(OCCLUSIONS)))
    for i, apply in enumerate(OCCLUSIONS.values(), start=1):
        apply(rows, i)
    return rows


@dataclass
class NeuralCouncil:
    model: NumpyCouncilNet  # the weights, and the forward a decision runs
    temperature: float
    vote_weights: tuple[float, ...]
    name: str
    # (deny at or below, approve at or above) chosen on outcomes when it was trained on them
    # (council.train, target "outcome"); None: the fleet file's or the policy's band
    band: tuple[float, float] | None = None
    _settings: tuple[CouncilSettings, tuple[float, float] | None, CouncilSettings] | None = field(
        default=None, init=False, repr=False, compare=False
    )  # see _voting

    @classmethod
    def of(
        cls, net: CouncilNet, temperature: float, vote_weights: tuple[float, ...], name: str
    ) -> NeuralCouncil:
        """A council with a torch model's weights (training), copied."""
        state = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
        return cls(NumpyCouncilNet(net.spec, state), temperature, vote_weights, name)

    @classmethod
    def load(cls, path: str | Path | None = None) -> NeuralCouncil:
        """The council in weights file `path`, or a shipped one: None (the default, trained to
        the reference rules) or a name in SHIPPED_NAMES."""
        shipped = SHIPPED_NAMES.get(path) if isinstance(path, str) else None
        return _load(str(Path(shipped or path or SHIPPED).resolve()))

    def save(self, path: str | Path, **meta: object) -> None:
        """`path` (council.pt) and council.npz beside it: see council/weightfiles.py."""
        blob: dict[str, object] = {
            "spec": self.model.spec.to_dict(),
            "state": self.net.state_dict(),
            "temperature": self.temperature,
            "vote_weights": list(self.vote_weights),
            "meta": meta,
        }
        if self.band is not None:  # weights without one keep their bytes
            blob["band"] = list(self.band)
        weightfiles.write(Path(path), blob)

    @property
    def members(self) -> tuple[str, ...]:
        return self.model.spec.members

    @functools.cached_property
    def net(self) -> CouncilNet:
        """The torch model with these weights, for training, notebooks and benchmarks (built
        outside inference mode even when first used inside it, so that it stays trainable)."""
        import torch

        from council.torch_net import CouncilNet

        with torch.inference_mode(False):
            net = CouncilNet(self.model.spec)
            net.load_state_dict({k: torch.from_numpy(v) for k, v in self.model.state.items()})
        return net.eval()

    def member_logits(self, enc: Encoded[Tensor], occlusions: bool = False) -> Tensor:
        """(members, batch) approval logits from the torch model; with `occlusions`, `enc` is
        one request followed by its occluded variants (with_occlusions), and the core runs
        once for them all."""
        import torch

        with torch.inference_mode():
            logit: Tensor = self.net(enc, rows=len(enc) if occlusions else 1).logit
        return logit

    def probabilities(self, batch: Sequence[RequestFeatures], threads: int = 1) -> Tensor:
        """(members, batch) approval probabilities, all members in one pass, on `threads`
        torch threads: torch's default pool spins against a busy machine's other processes
        (a batch of 1,024 took 3.4 s instead of 87 ms on 2 busy cores)."""
        import torch

        with torch_threads(threads):
            return torch.sigmoid(self.member_logits(encode(batch)))

    def council_probability(self, member_p: Tensor) -> Tensor:
        """Weighted mean over members (axis 0), then temperature scaling."""
        import torch

        w = torch.tensor(self.vote_weights, dtype=torch.float64).unsqueeze(1)
        p = ((member_p.double() * w).sum(0) / w.sum()).clamp(1e-15, 1 - 1e-15)
        return torch.sigmoid(torch.logit(p) / self.temperature)

    def decide(self, features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision:
        logits = self.model.logits(
            with_occlusions(encode_arrays([features])), rows=1 + len(OCCLUSIONS)
        )
        return self.decision(features, logits, settings)

    def decision(
        self, features: RequestFeatures, logits: NDArray[np.float64], settings: CouncilSettings
    ) -> CouncilDecision:
        """Votes, reasons and the combined decision from `logits` (members, 1 + occlusions):
        the request's, then each occluded variant's (with_occlusions)."""
        p = sigmoid(logits[:, 0]).tolist()
        effects = (logits[:, :1] - logits[:, 1:]).tolist()
        words = describe(features)
        votes = []
        for i, member in enumerate(self.members):
            strongest = sorted(
                ((g, e) for g, e in zip(OCCLUSIONS, effects[i], strict=True) if abs(e) >= 0.01),
                key=lambda ge: -abs(ge[1]),
            )[:TOP_REASONS]
            reasons = [
                Reason(feature=g, value=words[g][0], effect=e, text=words[g][1])
                for g, e in strongest
            ]
            verdict = (
                Verdict.ABSTAIN
                if abs(p[i] - 0.5) < ABSTAIN_MARGIN
                else Verdict.APPROVE
                if p[i] >= 0.5
                else Verdict.DENY
            )
            votes.append(
                MemberVote(
                    member=member,
                    verdict=verdict,
                    probability=p[i],
                    weight=self.vote_weights[i],
                    reasons=reasons,
                )
            )
        return combine(
            votes,
            self._voting(settings),
            self.name,
            self.temperature,
            gpu_hours=gpu_hours_asked(features),
        )

    def _voting(self, settings: CouncilSettings) -> CouncilSettings:
        """The settings the votes combine under: the policy's name and, where the council was
        trained on outcomes, its band. The same copy while the fleet's settings are the same
        object (they are frozen) and the band the same."""
        kept = self._settings
        if kept is not None and kept[0] is settings and kept[1] == self.band:
            return kept[2]
        update: dict[str, object] = {"policy": "neural"}
        if self.band is not None and settings.approve_threshold is settings.deny_threshold is None:
            update |= {"deny_threshold": self.band[0], "approve_threshold": self.band[1]}
        voting = settings.model_copy(update=update)
        self._settings = (settings, self.band, voting)
        return voting


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, as they were after it."""
    import torch

    if n < 1:
        raise ValueError(f"threads must be at least 1, not {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _first(error: BaseException, most: int = 160) -> str:
    """An error's first sentence, at most `most` characters: torch's unpickling errors go on
    for a paragraph, advising `weights_only=False`, which a file of unknown origin must not
    be given."""
    text = " ".join(str(error).split())
    first = text.split(". ")[0] or type(error).__name__  # an error that says nothing: its kind
    return first if len(first) <= most else first[: most - 3] + "..."


@functools.lru_cache(maxsize=8)
def _load(path: str) -> NeuralCouncil:
    try:
        header, state, digest = weightfiles.read(Path(path))
        model = NumpyCouncilNet(NetSpec.from_dict(header["spec"]), state)
    except (
        OSError,
        EOFError,
        KeyError,
        RuntimeError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,  # torch's weights-only unpickler, on a file that is no pickle
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        raise ConfigError(f"cannot load council weights from {path}: {_first(e)}") from e
    return NeuralCouncil(
        model,
        float(header["temperature"]),
        tuple(header["vote_weights"]),
        f"cfc-council-{digest[:8]}",
        None if header.get("band") is None else (header["band"][0], header["band"][1]),
    )

"""The neural council: trained CfC members, one batched pass, calibrated soft vote, reasons.

Reasons come from occlusion: each vote is recomputed with one feature group set to a neutral
value (no hoarding, no overruns, 50 % utilisation, no cost pressure, a fresh project's fair
share, an empty pool, normal priority); the change in the member's logit is that group's
effect. All variants run in the same batched pass as the vote itself.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from council.encoding import SEQ_BAD, SEQ_FREE, STATIC_BAD, STATIC_FREE, Encoded, encode
from council.features import RequestFeatures
from council.network import CouncilNet, NetSpec, Output
from council.reference import describe
from council.voting import combine
from fleet.config import CouncilSettings
from fleet.errors import ConfigError
from fleet.models import CouncilDecision, MemberVote, Reason, Verdict

SHIPPED = Path(__file__).parent / "weights" / "council.pt"
ABSTAIN_MARGIN = 0.05
TOP_REASONS = 3


Occlusion = Callable[[Encoded, int], None]  # neutralises one group in row i, in place


def _static(group: str, name: str, value: float) -> Occlusion:
    col = (STATIC_FREE if group == "static_free" else STATIC_BAD).index(name)

    def apply(e: Encoded, i: int) -> None:
        getattr(e, group)[i, col] = value
    return apply


def _record(name: str, value: float) -> Occlusion:
    col, rated = SEQ_BAD.index(name), SEQ_FREE.index("rated")

    def apply(e: Encoded, i: int) -> None:
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
    "hoarding_rate": _record("idle_release", 0.0),
    "overrun_rate": _record("budget_release", 0.0),
    "recent_util": _record("util_deficit", 0.5),
}


def with_occlusions(enc: Encoded) -> Encoded:
    """Row 0: the request as it is; row 1 + i: with OCCLUSIONS[i] neutralised. Occlusions
    touch only `bad` and static inputs, never what the recurrent core reads."""
    rows = enc.take(torch.zeros(1 + len(OCCLUSIONS), dtype=torch.long))
    for i, apply in enumerate(OCCLUSIONS.values(), start=1):
        apply(rows, i)
    return rows


@dataclass
class NeuralCouncil:
    net: CouncilNet
    temperature: float
    vote_weights: tuple[float, ...]
    name: str

    @classmethod
    def load(cls, path: str | Path | None = None) -> NeuralCouncil:
        return _load(str(Path(path or SHIPPED).resolve()))

    def save(self, path: str | Path, **meta: object) -> None:
        torch.save({"spec": self.net.spec.to_dict(), "state": self.net.state_dict(),
                    "temperature": self.temperature, "vote_weights": list(self.vote_weights),
                    "meta": meta}, path)

    @property
    def members(self) -> tuple[str, ...]:
        return self.net.spec.members

    @torch.inference_mode()
    def member_logits(self, enc: Encoded, occlusions: bool = False) -> Tensor:
        """(members, batch) approval logits; with `occlusions`, `enc` is one request followed
        by its occluded variants (with_occlusions), and the core runs once for them all."""
        out: Output = self.net(enc, rows=len(enc) if occlusions else 1)
        return out.logit

    def probabilities(self, batch: Sequence[RequestFeatures]) -> Tensor:
        """(members, batch) approval probabilities, all members in one pass."""
        return torch.sigmoid(self.member_logits(encode(batch)))

    def council_probability(self, member_p: Tensor) -> Tensor:
        """Weighted mean over members (axis 0), then temperature scaling."""
        w = torch.tensor(self.vote_weights, dtype=torch.float64).unsqueeze(1)
        p = ((member_p.double() * w).sum(0) / w.sum()).clamp(1e-15, 1 - 1e-15)
        return torch.sigmoid(torch.logit(p) / self.temperature)

    def decide(self, features: RequestFeatures, settings: CouncilSettings) -> CouncilDecision:
        with one_thread():
            logits = self.member_logits(with_occlusions(encode([features])), occlusions=True)
        p = torch.sigmoid(logits[:, 0]).tolist()
        effects = (logits[:, :1] - logits[:, 1:]).tolist()
        words = describe(features)
        votes = []
        for i, member in enumerate(self.members):
            reasons = sorted(
                (Reason(feature=g, value=words[g][0], effect=e, text=words[g][1])
                 for g, e in zip(OCCLUSIONS, effects[i], strict=True) if abs(e) >= 0.01),
                key=lambda r: -abs(r.effect))[:TOP_REASONS]
            verdict = Verdict.ABSTAIN if abs(p[i] - 0.5) < ABSTAIN_MARGIN else \
                Verdict.APPROVE if p[i] >= 0.5 else Verdict.DENY
            votes.append(MemberVote(member=member, verdict=verdict, probability=p[i],
                                    weight=self.vote_weights[i], reasons=reasons))
        return combine(votes, settings.model_copy(update={"policy": "neural"}), self.name,
                       self.temperature)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Small tensors: intra-op threads never pay, and idle ones keep spinning afterwards and
    slow the rest of the graph run (measured by benchmarks/graph_latency.py). Training uses
    it too, so that a seed gives the same bytes on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=8)
def _load(path: str) -> NeuralCouncil:
    try:
        blob = torch.load(path, weights_only=True)
        net = CouncilNet(NetSpec.from_dict(blob["spec"]))
        net.load_state_dict(blob["state"])
    except (OSError, EOFError, KeyError, RuntimeError, TypeError, ValueError,
            pickle.UnpicklingError) as e:
        raise ConfigError(f"cannot load council weights from {path}: {e}") from e
    net.eval()
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
    return NeuralCouncil(net, float(blob["temperature"]), tuple(blob["vote_weights"]),
                         f"cfc-council-{digest}")

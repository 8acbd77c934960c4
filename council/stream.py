"""A network that reads an allocation's utilisation stream and tells a pause from an ending.

The idle release (fleet.monitoring) waits a fixed time after the GPUs go idle: long enough
and most pauses survive it, short enough and most of an idle tail is not held. It reads
nothing but the clock. This model reads the stream event by event, each a stretch at one
utilisation (its level, how long it lasted, the share of the lease gone when it ended), and
then the idle stretch so far; it gives the chance that the work is over. The stretches are
of any length, so time enters a CfC through its time gate (`time="gate"`); a GRU reads it
only as an input (log hours), and a logistic regression reads a summary of the stream.

`sim/idle_stream.py` builds the streams from the workload model and compares these with the
fixed timeout, which is what they must beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from council.cfc import GRU, CfC
from council.stream_release import Query, sequence

Kind = Literal["cfc", "gru", "logistic"]
KINDS: tuple[Kind, ...] = ("cfc", "gru", "logistic")
SUMMARY = 7  # summary(): the logistic regression's inputs


def summary(q: Query) -> list[float]:
    """What a model without a sequence reads: the idle time so far, the lease's share gone,
    the work and the pauses seen so far and the last work's utilisation."""
    work = [h for u, h in q.before if u > 0]
    pauses = [h for u, h in q.before if u <= 0]
    elapsed = sum(h for _, h in q.before) + q.idle_hours
    last = next((u for u, _ in reversed(q.before) if u > 0), 0.0)
    return [
        math.log1p(q.idle_hours),
        min(elapsed / q.lease_hours, 4.0),
        math.log1p(sum(work)),
        float(len(pauses)),
        math.log1p(sum(pauses) / len(pauses)) if pauses else 0.0,
        last / 100.0,
        math.log1p(q.lease_hours),
    ]


@dataclass
class Batch:
    x: Tensor  # (B, T, 3), left-padded
    dt: Tensor  # (B, T)
    mask: Tensor  # (B, T)
    flat: Tensor  # (B, SUMMARY)


def batch(queries: Sequence[Query]) -> Batch:
    seqs = [sequence(q) for q in queries]
    width = max((len(s) for s, _ in seqs), default=1)
    x = torch.zeros(len(seqs), width, 3)
    dt = torch.zeros(len(seqs), width)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (steps, dts) in enumerate(seqs):
        n = len(steps)
        x[i, width - n :] = torch.tensor(steps)
        dt[i, width - n :] = torch.tensor(dts)
        mask[i, width - n :] = True
    flat = torch.tensor([summary(q) for q in queries]).reshape(len(queries), SUMMARY)
    return Batch(x, dt, mask, flat)


class StreamNet(nn.Module):
    """p(the work is over) for an idle stretch: a CfC or a GRU over the stream and a linear
    read-out, or a logistic regression on its summary."""

    mu: Tensor  # the summary's mean and sd on the training data (the logistic regression)
    sd: Tensor

    def __init__(self, kind: Kind, seed: int = 0, hidden: int = 16, backbone: int = 32) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        torch.manual_seed(seed)
        self.kind = kind
        self.core: CfC | GRU | None = None
        if kind == "cfc":
            self.core = CfC(1, 3, hidden, backbone, ("default",), seed, activation="silu")
        elif kind == "gru":
            self.core = GRU(1, 3, hidden, backbone, ("default",), seed)
        self.head = nn.Linear(hidden if self.core is not None else SUMMARY, 1)
        self.register_buffer("mu", torch.zeros(SUMMARY))
        self.register_buffer("sd", torch.ones(SUMMARY))

    def forward(self, b: Batch) -> Tensor:
        """Logits (B,)."""
        if self.core is None:
            out: Tensor = self.head((b.flat - self.mu) / self.sd).squeeze(-1)
            return out
        h, _, _ = self.core(b.x, b.dt, b.mask)  # the GRU reads time only as log(1 + hours)
        out = self.head(h[0]).squeeze(-1)
        return out


def fit(net: StreamNet, data: Batch, ended: Tensor, steps: int = 600, seed: int = 0) -> StreamNet:
    """Trained on `data` with labels `ended` (1: the idle stretch was the end): Adam on
    mini-batches for the sequence models, L-BFGS for the logistic regression."""
    gen = torch.Generator().manual_seed(seed)
    if net.core is None:
        net.mu.copy_(data.flat.mean(0))
        net.sd.copy_(data.flat.std(0).clamp_min(1e-6))
        opt = torch.optim.LBFGS(net.parameters(), max_iter=200)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(net(data), ended)
            loss = loss + 1e-3 * net.head.weight.square().sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        return net.eval()
    adam = torch.optim.Adam(net.parameters(), lr=3e-3)
    n = len(ended)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(256, n),), generator=gen)
        part = Batch(data.x[idx], data.dt[idx], data.mask[idx], data.flat[idx])
        loss = F.binary_cross_entropy_with_logits(net(part), ended[idx])
        adam.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        adam.step()
    return net.eval()


def probabilities(net: StreamNet, queries: Sequence[Query], chunk: int = 4096) -> list[float]:
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(queries), chunk):
            out += torch.sigmoid(net(batch(queries[i : i + chunk]))).tolist()
    return out

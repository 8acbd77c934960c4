"""Closed-form continuous-time (CfC) cells, written from the equations of Hasani et al.,
"Closed-form continuous-time neural networks", Nature Machine Intelligence 4 (2022):

    z  = act(W [x_k, h_{k-1}] + b)                           backbone (the paper's
                                                              lecun_tanh, or silu)
    f, g, h = heads(z)                                        g, h squashed by tanh
    gate = sigmoid(-f * dt_k)                                 the time gate
    h_k = gate * g + (1 - gate) * h                           "default" CfC
    h_k = g + gate * h                                        "no_gate" variant

dt_k is the time since the previous step, so irregular sampling enters through the gate:
1/|f| is the unit's time constant. Weights carry a leading member axis, so a whole council
of independent cells runs in one batched pass. A GRU with the same interface serves as the
ablation baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MODES = ("default", "no_gate")


def lecun_tanh(x: Tensor) -> Tensor:
    return 1.7159 * torch.tanh(0.666 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "lecun_tanh": lecun_tanh,
    "silu": nn.functional.silu,
}


def _init(members: int, fan_in: int, fan_out: int, gen: torch.Generator) -> nn.Parameter:
    bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier uniform, per member
    return nn.Parameter((torch.rand(members, fan_in, fan_out, generator=gen) * 2 - 1) * bound)


def check_dt(dt: Tensor) -> None:
    if not bool(torch.isfinite(dt).all()):
        raise ValueError("time steps must be finite")
    if bool((dt < 0).any()):
        raise ValueError("time steps must not be negative: times must be sorted")


@dataclass
class Trace:
    """Per-step internals for notebooks, each (members, batch, steps, hidden)."""

    gate: Tensor
    rate: Tensor  # f: the gate's decay rate per unit of dt; 1/|f| is the time constant
    hidden: Tensor

    @property
    def time_constant(self) -> Tensor:
        return 1.0 / self.rate.abs().clamp_min(1e-6)


class CfC(nn.Module):
    """`members` independent CfC cells (one mode each), run over left-padded sequences.

    `extra` adds that many linear read-outs of the backbone at every step (the network's
    evidence gates), computed in the same matrix product as the heads.
    """

    no_gate: Tensor
    activation: Callable[[Tensor], Tensor]

    def __init__(
        self,
        members: int,
        inputs: int,
        hidden: int,
        backbone: int,
        modes: tuple[str, ...],
        seed: int,
        extra: int = 0,
        activation: str = "lecun_tanh",
    ) -> None:
        super().__init__()
        if len(modes) != members or any(m not in MODES for m in modes):
            raise ValueError(f"one mode per member, each one of {MODES}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        gen = torch.Generator().manual_seed(seed)
        self.hidden, self.extra = hidden, extra
        self.activation = ACTIVATIONS[activation]
        self.w_in = _init(members, inputs, backbone, gen)
        self.w_rec = _init(members, hidden, backbone, gen)
        self.b = nn.Parameter(torch.zeros(members, 1, backbone))
        self.w_heads = _init(members, backbone, 3 * hidden + extra, gen)
        self.b_heads = nn.Parameter(torch.zeros(members, 1, 3 * hidden + extra))
        self.register_buffer(
            "no_gate", torch.tensor([m == "no_gate" for m in modes]).view(members, 1, 1)
        )

    def forward(
        self,
        x: Tensor,
        dt: Tensor,
        mask: Tensor,
        in_mask: Tensor | None = None,
        trace: bool = False,
    ) -> tuple[Tensor, Tensor, Trace | None]:
        """x (B, T, F), dt (B, T), mask (B, T): True for real steps, padding first.

        Returns the last state (M, B, H), the extra read-outs (M, B, T, extra) and, with
        `trace`, the gates and rates.
        """
        check_dt(dt)
        hid = self.hidden
        w_in = self.w_in if in_mask is None else self.w_in * in_mask.unsqueeze(-1)
        xp = torch.einsum("btf,mfu->tmbu", x, w_in) + self.b
        steps, m, b = xp.shape[0], xp.shape[1], xp.shape[2]
        neg_dt = (-dt).t().reshape(steps, 1, b, 1)
        keep = mask.t().reshape(steps, 1, b, 1)
        padded = not bool(mask.all())
        no_gate = self.no_gate if bool(self.no_gate.any()) else None
        h = x.new_zeros(m, b, hid)
        extras, gates, rates, hs = [], [], [], []
        act, w_rec, w_heads, b_heads = self.activation, self.w_rec, self.w_heads, self.b_heads
        for k in range(steps):  # the hot loop: one decision runs it once per event
            z = act(torch.baddbmm(xp[k], h, w_rec))
            heads = torch.baddbmm(b_heads, z, w_heads)
            f = heads[..., :hid]
            gh = torch.tanh(heads[..., hid : 3 * hid])
            g, hh = gh[..., :hid], gh[..., hid:]
            gate = torch.sigmoid(f * neg_dt[k])
            new = torch.lerp(hh, g, gate)
            if no_gate is not None:
                new = torch.where(no_gate, g + gate * hh, new)
            h = torch.where(keep[k], new, h) if padded else new
            extras.append(heads[..., 3 * hid :])
            if trace:
                gates.append(gate)
                rates.append(f)
                hs.append(h)
        out = (
            Trace(torch.stack(gates, 2), torch.stack(rates, 2), torch.stack(hs, 2))
            if trace
            else None
        )
        return h, torch.stack(extras, 2), out


class GRU(nn.Module):
    """`members` independent GRU cells with the CfC's interface; time only as an input."""

    def __init__(
        self,
        members: int,
        inputs: int,
        hidden: int,
        backbone: int,
        modes: tuple[str, ...],
        seed: int,
        extra: int = 0,
        activation: str = "lecun_tanh",
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.hidden = hidden
        self.w_in = _init(members, inputs, 3 * hidden, gen)
        self.w_rec = _init(members, hidden, 3 * hidden, gen)
        self.b = nn.Parameter(torch.zeros(members, 1, 3 * hidden))
        self.w_out = _init(members, hidden, extra, gen)
        self.b_out = nn.Parameter(torch.zeros(members, 1, extra))

    def forward(
        self,
        x: Tensor,
        dt: Tensor,
        mask: Tensor,
        in_mask: Tensor | None = None,
        trace: bool = False,
    ) -> tuple[Tensor, Tensor, Trace | None]:
        check_dt(dt)
        w_in = self.w_in if in_mask is None else self.w_in * in_mask.unsqueeze(-1)
        xp = torch.einsum("btf,mfu->tmbu", x, w_in) + self.b
        steps, m, b = xp.shape[0], xp.shape[1], xp.shape[2]
        keep = mask.t().reshape(steps, 1, b, 1)
        h = x.new_zeros(m, b, self.hidden)
        extras = []
        for k in range(steps):
            xr, xz, xn = xp[k].chunk(3, dim=-1)
            hr, hz, hn = torch.bmm(h, self.w_rec).chunk(3, dim=-1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = torch.where(keep[k], torch.lerp(torch.tanh(xn + r * hn), h, z), h)
            extras.append(torch.baddbmm(self.b_out, h, self.w_out))
        return h, torch.stack(extras, 2), None

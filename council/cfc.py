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
        `trace`, the gates and rates. A padded step leaves the state at zero, so it is not
        computed: its read-outs, gates and rates are zero.
        """
        check_dt(dt)
        hid = self.hidden
        b, steps = mask.shape
        m = self.w_in.shape[0]
        live, order = _live_prefix(mask)
        if order is not None:  # longest first: the rows live at a step are a prefix
            x, dt, mask = x[order], dt[order], mask[order]
        w_in = self.w_in if in_mask is None else self.w_in * in_mask.unsqueeze(-1)
        # torch's float32 tanh runs several times slower than its sigmoid on a CPU (it was most
        # of a batch's forward), and tanh(u) = 2 sigmoid(2u) - 1: so the heads of g and h are
        # doubled (exact, a power of two) and the loop keeps l = (h + 1) / 2, in [0, 1], for h:
        # h_k = lerp(tanh h', tanh g', gate) = 2 lerp(sigmoid 2h', sigmoid 2g', gate) - 1, and
        # h @ w_rec = l @ (2 w_rec) - (the sum of w_rec's rows), which joins the input's bias.
        double = torch.ones_like(self.b_heads)
        double[..., hid : 3 * hid] = 2.0
        w_heads, b_heads = self.w_heads * double, self.b_heads * double
        w_rec = self.w_rec * 2.0
        bias = self.b - self.w_rec.sum(1, keepdim=True)
        # the input projection of every live step in one product, step after step: step k's
        # rows follow the earlier steps' (a padded step is never computed)
        live_steps = mask.t()
        xp = torch.baddbmm(bias, x.transpose(0, 1)[live_steps].expand(m, -1, -1), w_in)
        neg_dt = -dt.t()[live_steps].view(1, -1, 1)
        no_gate = self.no_gate if bool(self.no_gate.any()) else None
        state = x.new_zeros(m, 0, hid)  # l
        extras = x.new_zeros(m, b, steps, self.extra)
        traced: list[Tensor] = [x.new_zeros(m, b, steps, hid) for _ in range(3 if trace else 0)]
        act = self.activation
        start = 0
        for k, n in enumerate(live):  # the hot loop: one decision runs it once per event
            if n == 0:
                continue
            if n > state.shape[1]:  # sequences that start here, from h = 0
                state = torch.cat([state, state.new_full((m, n - state.shape[1], hid), 0.5)], 1)
            rows = slice(start, start + n)
            start += n
            z = act(torch.baddbmm(xp[:, rows], state, w_rec))
            heads = torch.baddbmm(b_heads, z, w_heads)
            f = heads[..., :hid]
            gh = torch.sigmoid(heads[..., hid : 3 * hid])
            g, hh = gh[..., :hid], gh[..., hid:]  # as l is: (g + 1) / 2, (h + 1) / 2
            gate = torch.sigmoid(f * neg_dt[:, rows])
            state = torch.lerp(hh, g, gate)
            if no_gate is not None:  # h_k = tanh g' + gate * tanh h'
                state = torch.where(no_gate, g + gate * (hh - 0.5), state)
            extras[:, :n, k] = heads[..., 3 * hid :]
            if trace:
                for out, step in zip(traced, (gate, f, state * 2 - 1), strict=True):
                    out[:, :n, k] = step
        h = state * 2 - 1
        if h.shape[1] < b:  # sequences with no step at all
            h = torch.cat([h, h.new_zeros(m, b - h.shape[1], hid)], dim=1)
        if order is not None:
            back = torch.argsort(order)
            h, extras = h[:, back], extras[:, back]
            traced = [t[:, back] for t in traced]
        return h, extras, Trace(*traced) if trace else None


def longest_first(mask: Tensor) -> Tensor | None:
    """The order that puts the longest sequences first (stable), or None where they are."""
    lengths = mask.sum(1)
    if bool((lengths[1:] <= lengths[:-1]).all()):
        return None
    return torch.argsort(lengths, descending=True, stable=True)


def _live_prefix(mask: Tensor) -> tuple[list[int], Tensor | None]:
    """How many sequences are live at each step once longest first, and that order (None:
    they are). Raises where padding does not come first."""
    b, steps = mask.shape
    if bool(mask.all()):
        return [b] * steps, None
    starts = steps - mask.sum(1)
    if not bool((mask == (torch.arange(steps, device=mask.device) >= starts.unsqueeze(1))).all()):
        raise ValueError("padding must come first: each sequence's steps are its last ones")
    live = torch.bincount(starts, minlength=steps + 1).cumsum(0)[:steps].tolist()
    return live, longest_first(mask)


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

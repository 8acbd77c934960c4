"""The council's members as one batched network: a recurrent core over the project's record,
monotone evidence accumulators, and a vote head.

Each member m computes

    logit_m = head_m(h_T, static_free) - penalty_m(rates_m, static_bad)

- h_T: the last state of the member's CfC (or, for ablations, GRU) over the `free` inputs;
- rates_m: C evidence accumulators, each a decaying weighted mean of non-negative mixes of
  the `bad` inputs. Decay exp(-r_k * dt_k) and weight w_k come from the core's backbone,
  which sees only free inputs, so every rate is a positive combination of bad inputs; a
  neutral prior (learned, never decayed) means old evidence is forgotten;
- penalty_m: a sum of increasing softplus hinges with non-negative weights.
So approval probability can only fall when overruns, idling or low utilisation grow, or when
cost pressure, unfairness, the request's share of the pool or the pool's load grow: monotone
by construction, for every weight the training finds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from council.cfc import GRU, CfC, Trace, _init, longest_first
from council.encoding import GROUPS, Encoded
from council.spec import NetSpec

ALL = "*"

# What each perspective reads; generalists read everything.
PERSPECTIVES: dict[str, dict[str, tuple[str, ...]]] = {
    "cost": {
        "seq_free": ("gpus", "hours", "cost", "is_request", "is_summary"),
        "seq_bad": (),
        "static_free": ("budgeted", "worst_case_usd", "count", "duration"),
        "static_bad": ("cost_pressure", "purpose_mismatch"),
    },
    "fairness": {
        "seq_free": ("gpus", "hours", "gpu_hours", "is_request", "is_summary"),
        "seq_bad": (),
        "static_free": ("usage_share", "history_len"),
        "static_bad": ("unfair_share",),
    },
    "capacity": {
        "seq_free": ("gpus", "fleet_busy", "is_request", "is_summary"),
        "seq_bad": (),
        "static_free": ("priority", "count"),
        "static_bad": ("pool_share", "pool_busy"),
    },
    "risk": {
        "seq_free": (ALL,),
        "seq_bad": (ALL,),
        "static_free": ("history_len",),
        "static_bad": ("purpose_mismatch",),
    },
}
GENERAL = {"seq_free": (ALL,), "seq_bad": (ALL,), "static_free": (ALL,), "static_bad": (ALL,)}


def _mask(spec: NetSpec, group: str) -> Tensor:
    names = spec.inputs(group)
    rows = []
    for p in spec.perspectives:
        wanted = (GENERAL if p == "general" else PERSPECTIVES[p])[group]
        rows.append([1.0 if ALL in wanted or n in wanted else 0.0 for n in names])
    return torch.tensor(rows)


@dataclass
class Output:
    logit: Tensor  # (M, B) approval logit
    outcome_logit: Tensor  # (M, B) logit that the allocation will be wasted (auxiliary)
    rates: Tensor  # (M, B, C) evidence accumulators
    trace: Trace | None = None
    decay: Tensor | None = field(default=None)  # (M, B, T, C) per-step evidence decay


class CouncilNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        m, c = len(spec.members), spec.channels
        inputs = len(spec.seq_free) + (1 if spec.time == "input" else 0)
        core_cls = CfC if spec.core == "cfc" else GRU
        self.core = core_cls(
            m,
            inputs,
            spec.hidden,
            spec.backbone,
            spec.modes,
            spec.seed,
            extra=2 * c,
            activation=spec.activation,
        )
        gen = torch.Generator().manual_seed(spec.seed + 1)
        self.mix = nn.Parameter(torch.zeros(m, c, len(spec.seq_bad)))
        self.prior_num = nn.Parameter(torch.zeros(m, 1, c))
        self.prior_den = nn.Parameter(torch.ones(m, 1, c))
        d = c + len(spec.static_bad)
        self.pen_lin = nn.Parameter(torch.zeros(m, 1, d))
        self.pen_alpha = nn.Parameter(torch.full((m, 1, d, spec.hinges), -2.0))
        self.pen_beta = nn.Parameter(torch.ones(m, 1, d, spec.hinges))
        self.pen_gamma = nn.Parameter(torch.linspace(-2, 0, spec.hinges).repeat(m, 1, d, 1))
        self.w1 = _init(m, spec.hidden + len(spec.static_free), spec.head, gen)
        self.b1 = nn.Parameter(torch.zeros(m, 1, spec.head))
        self.w2 = _init(m, spec.head, 2, gen)
        self.b2 = nn.Parameter(torch.zeros(m, 1, 2))
        self.outcome_k = nn.Parameter(torch.zeros(m, 1))
        for group in GROUPS:
            self.register_buffer(f"mask_{group}", _mask(spec, group))

    def _buf(self, name: str) -> Tensor:
        t = getattr(self, name)
        assert isinstance(t, Tensor)
        return t

    def forward(self, enc: Encoded[Tensor], trace: bool = False, rows: int = 1) -> Output:
        """`rows` > 1: `enc` holds one request repeated `rows` times with only its `bad` and
        static inputs changed (council/neural_council.py's occlusions); those never reach the
        recurrent core, so it runs once, on the first row, and its result is shared.

        Requests of different lengths run longest first, so that the CfC computes no padded
        step (council/cfc.py), and their outputs come back in the batch's order. `enc` holds
        every input the encoding makes; the network reads those its spec names."""
        enc = self.spec.read(enc)
        order = longest_first(enc.mask) if rows == 1 else None
        if order is None:
            return self._forward(enc, trace, rows)
        out = self._forward(enc.take(order), trace, rows)
        back = torch.argsort(order)
        tr = out.trace
        return Output(
            out.logit[:, back],
            out.outcome_logit[:, back],
            out.rates[:, back],
            None if tr is None else Trace(tr.gate[:, back], tr.rate[:, back], tr.hidden[:, back]),
            None if out.decay is None else out.decay[:, back],
        )

    def _forward(self, enc: Encoded[Tensor], trace: bool, rows: int) -> Output:
        spec = self.spec
        dt = enc.dt if spec.time == "gate" else enc.mask.float()
        first = enc.take(torch.arange(1)) if rows > 1 else enc
        free = first.free
        in_mask = self._buf("mask_seq_free")
        if spec.time == "input":
            free = torch.cat([free, torch.log1p(first.dt).unsqueeze(-1)], dim=-1)
            in_mask = torch.cat([in_mask, in_mask.new_ones(in_mask.shape[0], 1)], dim=1)
        core_dt = first.dt if spec.time == "gate" else first.mask.float()
        h, acc, tr = self.core(free, core_dt, first.mask, in_mask, trace)
        if rows > 1:
            h, acc = h.expand(-1, rows, -1), acc.expand(-1, rows, -1, -1)
        rate, weight = (a.clamp(-20.0, 10.0) for a in acc.chunk(2, dim=-1))  # contiguous
        log_decay = -torch.exp(rate) * dt.view(1, *dt.shape, 1)
        # decay from step k to the end: the sum of the later steps' log decays, summed from the
        # end (a total minus a running sum cancels thousands in float32: 2e-4 in probability)
        after = F.pad(log_decay.flip(2).cumsum(2).flip(2)[:, :, 1:], (0, 0, 0, 1))
        # below e^-80 a step's weight is nothing beside the last step's (at least e^-20), and
        # torch's float32 exp takes a slow path where it underflows
        kept = enc.mask.to(after.dtype).view(1, *enc.mask.shape, 1)
        carried = torch.exp((weight + after).clamp_min(-80.0)) * kept
        mix = F.softplus(self.mix) * self._buf("mask_seq_bad").unsqueeze(1)
        evidence = torch.einsum("btf,mcf->mbtc", enc.bad, mix)
        num = F.softplus(self.prior_num) + (carried * evidence).sum(2)
        den = F.softplus(self.prior_den) + carried.sum(2)
        rates = num / den

        static_bad = enc.static_bad.unsqueeze(0) * self._buf("mask_static_bad").unsqueeze(1)
        u = torch.cat([rates, static_bad], dim=-1).unsqueeze(-1)  # (M, B, D, 1)
        hinges = F.softplus(self.pen_alpha) * F.softplus(
            F.softplus(self.pen_beta) * u + self.pen_gamma
        )
        penalty = (F.softplus(self.pen_lin) * u.squeeze(-1)).sum(-1) + hinges.sum((-1, -2))

        static = enc.static_free.unsqueeze(0) * self._buf("mask_static_free").unsqueeze(1)
        hidden = torch.tanh(torch.baddbmm(self.b1, torch.cat([h, static], dim=-1), self.w1))
        head = torch.baddbmm(self.b2, hidden, self.w2)
        logit = head[..., 0] - penalty
        outcome = head[..., 1] + F.softplus(self.outcome_k) * penalty
        return Output(logit, outcome, rates, tr, torch.exp(log_decay) if trace else None)


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

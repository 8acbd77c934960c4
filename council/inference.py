"""CouncilNet's forward pass in numpy, from the same state dict: what a decision runs, so that
`gpu-agent request` never imports torch (over a second of a new process, on a 2-core machine).

It computes the approval logits of council/torch_net.py, in float64, and agrees with the torch
model run in float64 to 1e-9 and with its float32 to 1e-6 in probability
(tests/test_council_inference.py): both sum the evidence decay from the end, as a total less a
running sum cancelled thousands (in float32, up to 2e-4). The torch model computes the same
CfC in another form (the batch longest first, padded steps skipped, tanh through sigmoid: see
council/cfc.py); this one keeps the equations as written. Training, the outcome head and the
traces stay with the torch model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from council.encoding import Encoded
from council.spec import NetSpec

Array = NDArray[np.float64]


def sigmoid(x: Array) -> Array:
    return np.exp(-np.logaddexp(0.0, -x))  # no overflow warning for large |x|


def softplus(x: Array) -> Array:
    """torch's softplus: linear above 20."""
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "lecun_tanh": lambda x: 1.7159 * np.tanh(0.666 * x),
    "silu": lambda x: x * sigmoid(x),
}


class NumpyCouncilNet:
    """The council network's approval logits; the masks and input-independent transforms
    of the weights (softplus of the penalty's and mixes' parameters) are applied once, here."""

    def __init__(self, spec: NetSpec, state: Mapping[str, NDArray[Any]]) -> None:
        if spec.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        self.spec = spec
        self.state = dict(state)  # as loaded: what the torch model's state dict holds
        s = {k: v.astype(np.float64) for k, v in state.items() if v.dtype != np.bool_}
        self.act = ACTIVATIONS[spec.activation]
        no_gate = state.get("core.no_gate")  # the CfC's per-member mode; the GRU has none
        self.no_gate = no_gate if no_gate is not None and bool(no_gate.any()) else None
        in_mask = s["mask_seq_free"]
        if spec.time == "input":
            in_mask = np.concatenate([in_mask, np.ones_like(in_mask[:, :1])], axis=1)
        self.core = {k.removeprefix("core."): v for k, v in s.items() if k.startswith("core.")}
        self.core["w_in"] = self.core["w_in"] * in_mask[..., None]
        self.mix = softplus(s["mix"]) * s["mask_seq_bad"][:, None]
        self.prior_num, self.prior_den = softplus(s["prior_num"]), softplus(s["prior_den"])
        self.pen_lin = softplus(s["pen_lin"])
        self.pen_alpha, self.pen_beta = softplus(s["pen_alpha"]), softplus(s["pen_beta"])
        self.pen_gamma = s["pen_gamma"]
        self.w1, self.b1, self.w2, self.b2 = s["w1"], s["b1"], s["w2"], s["b2"]
        self.mask_static_bad = s["mask_static_bad"][:, None]
        self.mask_static_free = s["mask_static_free"][:, None]

    def logits(self, enc: Encoded[NDArray[Any]], rows: int = 1) -> Array:
        """(members, batch) approval logits, as CouncilNet.forward(enc, rows=rows).logit."""
        spec = self.spec
        read = spec.read(enc)
        enc = Encoded(
            *(
                a.astype(np.float64) if a.dtype == np.float32 else a
                for a in (
                    read.free,
                    read.bad,
                    read.dt,
                    read.mask,
                    read.static_free,
                    read.static_bad,
                )
            )
        )
        dt = enc.dt if spec.time == "gate" else enc.mask.astype(np.float64)
        first = enc.take([0]) if rows > 1 else enc
        free = first.free
        if spec.time == "input":
            free = np.concatenate([free, np.log1p(first.dt)[..., None]], axis=-1)
        core_dt = first.dt if spec.time == "gate" else first.mask.astype(np.float64)
        core = self._cfc if spec.core == "cfc" else self._gru
        h, acc = core(free, core_dt, first.mask)
        m = h.shape[0]
        if rows > 1:
            h = np.broadcast_to(h, (m, rows, h.shape[2]))
            acc = np.broadcast_to(acc, (m, rows, *acc.shape[2:]))
        rate, weight = np.split(np.clip(acc, -20.0, 10.0), 2, axis=-1)
        log_decay = -np.exp(rate) * dt[None, :, :, None]
        after = np.zeros_like(log_decay)  # decay from k to the end, summed from the end
        after[:, :, :-1] = np.cumsum(log_decay[:, :, :0:-1], axis=2)[:, :, ::-1]
        carried = np.exp(weight + after) * enc.mask[None, :, :, None]
        evidence = np.einsum("btf,mcf->mbtc", enc.bad, self.mix)
        rates = (self.prior_num + (carried * evidence).sum(2)) / (self.prior_den + carried.sum(2))
        static_bad = enc.static_bad[None] * self.mask_static_bad
        u = np.concatenate([rates, static_bad], axis=-1)
        hinges = self.pen_alpha * softplus(self.pen_beta * u[..., None] + self.pen_gamma)
        penalty = (self.pen_lin * u).sum(-1) + hinges.sum((-1, -2))
        static = enc.static_free[None] * self.mask_static_free
        hidden = np.tanh(self.b1 + np.concatenate([h, static], axis=-1) @ self.w1)
        head = self.b2 + hidden @ self.w2
        out: Array = head[..., 0] - penalty
        return out

    def _cfc(self, x: Array, dt: Array, mask: NDArray[np.bool_]) -> tuple[Array, Array]:
        """council/cfc.py's CfC: the last state (M, B, H) and the read-outs (M, B, T, extra)."""
        _check_dt(dt)
        c, hid = self.core, self.spec.hidden
        xp = np.einsum("btf,mfu->tmbu", x, c["w_in"]) + c["b"]
        steps, m, b = xp.shape[:3]
        neg_dt, keep = -dt.T.reshape(steps, 1, b, 1), mask.T.reshape(steps, 1, b, 1)
        padded = not bool(mask.all())
        h = np.zeros((m, b, hid))
        extras = []
        for k in range(steps):
            z = self.act(xp[k] + h @ c["w_rec"])
            heads = c["b_heads"] + z @ c["w_heads"]
            f = heads[..., :hid]
            gh = np.tanh(heads[..., hid : 3 * hid])
            g, hh = gh[..., :hid], gh[..., hid:]
            gate = sigmoid(f * neg_dt[k])
            new = hh + gate * (g - hh)
            if self.no_gate is not None:
                new = np.where(self.no_gate, g + gate * hh, new)
            h = np.where(keep[k], new, h) if padded else new
            extras.append(heads[..., 3 * hid :])
        return h, np.stack(extras, 2)

    def _gru(self, x: Array, dt: Array, mask: NDArray[np.bool_]) -> tuple[Array, Array]:
        """council/cfc.py's GRU (the ablation core): time only as an input."""
        _check_dt(dt)
        c, hid = self.core, self.spec.hidden
        xp = np.einsum("btf,mfu->tmbu", x, c["w_in"]) + c["b"]
        steps, m, b = xp.shape[:3]
        keep = mask.T.reshape(steps, 1, b, 1)
        h = np.zeros((m, b, hid))
        extras = []
        for k in range(steps):
            xr, xz, xn = np.split(xp[k], 3, axis=-1)
            hr, hz, hn = np.split(h @ c["w_rec"], 3, axis=-1)
            r, z = sigmoid(xr + hr), sigmoid(xz + hz)
            n = np.tanh(xn + r * hn)
            h = np.where(keep[k], n + z * (h - n), h)
            extras.append(c["b_out"] + h @ c["w_out"])
        return h, np.stack(extras, 2)


def _check_dt(dt: Array) -> None:
    """council/cfc.py's check, with its errors."""
    if not bool(np.isfinite(dt).all()):
        raise ValueError("time steps must be finite")
    if bool((dt < 0).any()):
        raise ValueError("time steps must not be negative: times must be sorted")

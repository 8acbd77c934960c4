"""CouncilNet's forward pass in numpy, from the same state dict: what a decision runs, so that
`gpu-agent request` never imports torch (over a second of a new process, on a 2-core machine).

It computes the approval logits of council/torch_net.py, in float64, and agrees with the torch
model run in float64 to 1e-9 and with its float32 to 1e-6 in probability
(tests/test_council_inference.py): both sum the evidence decay from the end, as a total less a
running sum cancelled thousands (in float32, up to 2e-4). The torch model computes the same
CfC in another form (the batch longest first, padded steps skipped, tanh through sigmoid: see
council/cfc.py); this one computes sigmoid through tanh, in few numpy calls a step (_cfc).
Training, the outcome head and the traces stay with the torch model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


# The backbone's activation as act(x) = outer * f(inner * x): f = tanh for lecun_tanh, and for
# silu (x sigmoid(x) = x / (1 + e^-x)) f(a) = a / (1 + e^a) with inner = outer = -1. The scales
# join the weights, so that a step applies one transcendental ufunc, and for silu exp rather
# than tanh (numpy has no sigmoid ufunc, and its float64 tanh is not vectorised: over twice
# exp's time a number; exp(-logaddexp) costs several tanh).
ACTIVATIONS: dict[str, tuple[float, float]] = {"lecun_tanh": (0.666, 1.7159), "silu": (-1.0, -1.0)}


class NumpyCouncilNet:
    """The council network's approval logits; the masks and input-independent transforms
    of the weights (softplus of the penalty's and mixes' parameters, the CfC's weights
    arranged for its loop) are applied once, here."""

    def __init__(self, spec: NetSpec, state: Mapping[str, NDArray[Any]]) -> None:
        if spec.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
        self.spec = spec
        self.state = dict(state)  # as loaded: what the torch model's state dict holds
        s = {k: v.astype(np.float64) for k, v in state.items() if v.dtype != np.bool_}
        no_gate = state.get("core.no_gate")  # the CfC's per-member mode; the GRU has none
        self.no_gate = no_gate if no_gate is not None and bool(no_gate.any()) else None
        in_mask = s["mask_seq_free"]
        if spec.time == "input":
            in_mask = np.concatenate([in_mask, np.ones_like(in_mask[:, :1])], axis=1)
        self.core = {k.removeprefix("core."): v for k, v in s.items() if k.startswith("core.")}
        self.core["w_in"] = self.core["w_in"] * in_mask[..., None]
        if spec.core == "cfc":
            self.loop = _cfc_weights(self.core, spec.hidden, spec.activation)
        self.mix = softplus(s["mix"]) * s["mask_seq_bad"][:, None]
        self.prior_num, self.prior_den = softplus(s["prior_num"]), softplus(s["prior_den"])
        self.pen_lin = softplus(s["pen_lin"])
        self.pen_alpha, self.pen_beta = softplus(s["pen_alpha"]), softplus(s["pen_beta"])
        self.pen_gamma = s["pen_gamma"]
        hid = spec.hidden  # the head reads the state and the static inputs, masked (0 or 1)
        self.w1_h = s["w1"][:, :hid]
        self.w1_static = s["w1"][:, hid:] * s["mask_static_free"][..., None]
        self.b1, self.w2, self.b2 = s["b1"], s["w2"][..., :1], s["b2"][..., 0]
        self.mask_static_bad = s["mask_static_bad"][:, None]

    def logits(self, enc: Encoded[NDArray[Any]], rows: int = 1) -> Array:
        """(members, batch) approval logits, as CouncilNet.forward(enc, rows=rows).logit.

        With `rows` > 1 the rows differ only in what the core does not read, so the core and
        the evidence's decay run on the first row alone."""
        spec = self.spec
        enc = spec.read(enc)  # the inputs the weights were trained on
        n = 1 if rows > 1 else len(enc)
        mask = enc.mask[:n]
        free, dt = enc.free[:n].astype(np.float64), enc.dt[:n].astype(np.float64)
        if spec.time == "input":
            free = np.concatenate([free, np.log1p(dt)[..., None]], axis=-1)
        if spec.time != "gate":
            dt = mask.astype(np.float64)
        core = self._cfc if spec.core == "cfc" else self._gru
        h, acc = core(free, dt, mask)  # (M, n, H); (2, T, M, n, C): rates' and weights' logits
        rate, weight = np.clip(acc, -20.0, 10.0, out=acc)
        decay = np.exp(rate, out=rate)
        decay *= -dt.T[:, None, :, None]  # the log of each step's decay
        after = np.zeros_like(decay)  # decay from k to the end, summed from the end
        after[:-1] = np.cumsum(decay[:0:-1], axis=0)[::-1]
        weight += after
        carried = np.exp(weight, out=weight)
        if not bool(mask.all()):
            carried *= mask.T[:, None, :, None]
        # sum over t of carried (T, M, n, C) times the evidence bad (B, T, F) @ mix (M, C, F):
        # the steps summed first, (M, n, C, T) @ (B, T, F), then the mix
        seen = np.matmul(carried.transpose(1, 2, 3, 0), enc.bad.astype(np.float64))
        num = self.prior_num + (seen * self.mix[:, None]).sum(-1)
        rates = num / (self.prior_den + carried.sum(0))
        static_bad = enc.static_bad[None] * self.mask_static_bad
        u = np.concatenate([rates, static_bad], axis=-1)
        hinges = self.pen_alpha * softplus(self.pen_beta * u[..., None] + self.pen_gamma)
        penalty = (self.pen_lin * u).sum(-1) + hinges.sum((-1, -2))
        static = np.matmul(enc.static_free.astype(np.float64), self.w1_static)
        hidden = np.tanh(self.b1 + np.matmul(h, self.w1_h) + static)
        out: Array = self.b2 + np.matmul(hidden, self.w2)[..., 0] - penalty
        return out

    def _cfc(self, x: Array, dt: Array, mask: NDArray[np.bool_]) -> tuple[Array, Array]:
        """council/cfc.py's CfC: the last state (M, B, H) and its extra read-outs, time first,
        (2, T, M, B, C): the evidence's decay rates, then its weights, before clipping.

        The same equations, arranged for few numpy calls a step: each costs about a
        microsecond whatever its few hundred numbers (three times that on a strided view, or
        broadcasting), and numpy's float64 tanh costs over twice its exp. With
        1 + tanh(u) = 2 / (1 + e^(-2u)), the gate sigmoid(-f dt) is half of 1 + t, with
        t = tanh(-f dt / 2), and h_k = h + gate (g - h) is half the sum of the halves of
        q = [1 + t, 1 - t] * [tanh g, tanh h], the state the loop keeps (the recurrent
        weights, stacked twice and halved, read it). One product gives -2 times the
        pre-activations of [-f, f] and [g, h] (two contiguous blocks), one multiplication
        scales the first by dt / 2, and one exp, one addition and one division make
        [1 + t, 1 - t] and [1 + tanh g, 1 + tanh h]."""
        _check_dt(dt)
        w, hid = self.loop, self.spec.hidden
        xp = np.matmul(x.transpose(1, 0, 2)[:, None], w.w_in) + w.b  # (T, M, B, U)
        steps, m, b, width = xp.shape
        scale = np.broadcast_to(0.5 * dt.T[:, None, :, None], (steps, m, b, 2 * hid)).copy()
        keep = mask.T.reshape(steps, 1, b, 1)
        padded = not bool(mask.all())
        silu = self.spec.activation == "silu"
        one, two = np.array(1.0), np.array(2.0)  # arrays: numpy converts a float at every call
        z = np.empty((steps, m, b, width))  # the backbone at each step, over its outer scale
        q = np.zeros((m, b, 2 * hid))
        a, e = np.empty((m, b, width)), np.empty((m, b, width))
        heads = np.empty((2, m, b, 2 * hid))
        gate, gh = heads[0], heads[1]
        # names bound once and outputs passed by position: the loop is all calls
        matmul, exp, tanh, multiply, divide = np.matmul, np.exp, np.tanh, np.multiply, np.divide
        w_rec, w_heads, b_heads, no_gate = w.w_rec, w.w_heads, w.b_heads, self.no_gate
        with np.errstate(over="ignore"):  # e^u = inf where u > 709: the limits come out
            for k, (zk, xk, sk) in enumerate(zip(z, xp, scale, strict=True)):
                matmul(q, w_rec, a)
                a += xk
                if silu:  # a = -x: a / (1 + e^a) = -silu(x)
                    exp(a, e)
                    e += one
                    divide(a, e, zk)
                else:
                    tanh(a, zk)
                matmul(zk, w_heads, heads)
                heads += b_heads
                gate *= sk
                exp(heads, heads)
                heads += one
                divide(two, heads, heads)  # [1 + t, 1 - t], [1 + tanh g, 1 + tanh h]
                gh -= one
                if no_gate is None and not padded:  # the new state, in place
                    multiply(gate, gh, q)
                    continue
                new = gate * gh
                if no_gate is not None:  # h_k = g + gate h: q = [2 g, (1 + t) h]
                    ungated = [2.0 * gh[..., :hid], gate[..., :hid] * gh[..., hid:]]
                    new = np.where(no_gate, np.concatenate(ungated, axis=-1), new)
                np.copyto(q, new, where=keep[k])  # a padded step leaves the state as it was
        extras = np.matmul(z, w.w_extra)  # (2, T, M, B, C): rates' and weights' logits
        extras += w.b_extra
        return 0.5 * (q[..., :hid] + q[..., hid:]), extras

    def _gru(self, x: Array, dt: Array, mask: NDArray[np.bool_]) -> tuple[Array, Array]:
        """council/cfc.py's GRU (the ablation core): time only as an input; returns as _cfc."""
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
        return h, np.stack(np.split(np.stack(extras), 2, axis=-1))  # as _cfc's


def _check_dt(dt: Array) -> None:
    """council/cfc.py's check, with its errors."""
    if not bool(np.isfinite(dt).all()):
        raise ValueError("time steps must be finite")
    if bool((dt < 0).any()):
        raise ValueError("time steps must not be negative: times must be sorted")


@dataclass(frozen=True)
class _CfCWeights:
    """The CfC's weights as NumpyCouncilNet._cfc reads them."""

    w_in: Array  # (M, F, U), times the activation's inner scale; b, its bias, likewise
    b: Array
    w_rec: Array  # (M, 2H, U): stacked twice, halved, times the inner scale
    w_heads: Array  # (2, M, U, 2H): [-f, f] and [g, h], times the outer scale and -2
    b_heads: Array  # (2, M, 1, 2H): times -2
    w_extra: Array  # (2, 1, M, U, C): the read-outs (rates', weights'), times the outer scale
    b_extra: Array  # (2, 1, M, 1, C)


def _cfc_weights(core: Mapping[str, Array], hid: int, activation: str) -> _CfCWeights:
    """The weights arranged for _cfc; the scales are powers of two where the arithmetic must
    stay exact (the heads' -2 and the halving), the activation's own where it was trained."""
    inner, outer = ACTIVATIONS[activation]
    w, b = outer * core["w_heads"], core["b_heads"]
    heads_w, heads_b = -2.0 * w, -2.0 * b
    return _CfCWeights(
        w_in=inner * core["w_in"],
        b=inner * core["b"],
        w_rec=np.concatenate([core["w_rec"], core["w_rec"]], axis=1) * (0.5 * inner),
        w_heads=np.stack(
            [
                np.concatenate([-heads_w[..., :hid], heads_w[..., :hid]], -1),
                heads_w[..., hid : 3 * hid],
            ]
        ),
        b_heads=np.stack(
            [
                np.concatenate([-heads_b[..., :hid], heads_b[..., :hid]], -1),
                heads_b[..., hid : 3 * hid],
            ]
        ),
        w_extra=np.stack(np.split(w[..., 3 * hid :], 2, axis=-1))[:, None],
        b_extra=np.stack(np.split(b[..., 3 * hid :], 2, axis=-1))[:, None],
    )

"""The council network's shape: what the torch model (council/torch_net.py) is built from and
the numpy forward (council/inference.py) reads, kept free of torch so that loading a council
to decide never imports it.

It names the inputs the network reads (council/encoding.py encodes them all): their defaults
are those of the first weights (the `*_V1` groups), so a weights file written before a spec
named them loads; `NetSpec.current` is what a council trained now reads."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from council.encoding import (
    GROUPS,
    SEQ_BAD,
    SEQ_BAD_V1,
    SEQ_FREE_NOW,
    SEQ_FREE_V1,
    STATIC_BAD,
    STATIC_BAD_V1,
    STATIC_FREE,
    STATIC_FREE_V1,
    A,
    Encoded,
)

TimeMode = Literal["gate", "none", "input"]
Core = Literal["cfc", "gru"]


@dataclass(frozen=True)
class NetSpec:
    members: tuple[str, ...]
    perspectives: tuple[str, ...]  # a PERSPECTIVES key or "general", per member
    modes: tuple[str, ...]  # CfC mode per member
    core: Core = "cfc"
    time: TimeMode = "gate"
    hidden: int = 16
    backbone: int = 32
    activation: str = "silu"  # the backbone's; the paper's default lecun_tanh is 6x slower here
    channels: int = 4
    hinges: int = 2
    head: int = 16
    seed: int = 0
    seq_free: tuple[str, ...] = SEQ_FREE_V1
    seq_bad: tuple[str, ...] = SEQ_BAD_V1
    static_free: tuple[str, ...] = STATIC_FREE_V1
    static_bad: tuple[str, ...] = STATIC_BAD_V1

    def inputs(self, group: str) -> tuple[str, ...]:
        """The inputs of `group` (seq_free, seq_bad, static_free, static_bad) it reads."""
        names: tuple[str, ...] = getattr(self, group)
        return names

    def columns(self, group: str) -> list[int]:
        """Where the inputs of `group` it reads sit in the encoding's, in its order."""
        every = GROUPS[group]
        unknown = [n for n in self.inputs(group) if n not in every]
        if unknown:
            raise ValueError(f"unknown {group} inputs: {', '.join(unknown)}")
        return [every.index(n) for n in self.inputs(group)]

    def read(self, enc: Encoded[A]) -> Encoded[A]:
        """What it reads of `enc` (numpy arrays or torch tensors): its columns (a view where
        they lead the group's, as the first weights' do); `enc` itself where that is every
        column."""
        cols = _selection(self)
        if cols is None:
            return enc
        return Encoded(
            enc.free[..., cols["seq_free"]],
            enc.bad[..., cols["seq_bad"]],
            enc.dt,
            enc.mask,
            enc.static_free[..., cols["static_free"]],
            enc.static_bad[..., cols["static_bad"]],
        )

    @staticmethod
    def current(**kw: object) -> NetSpec:
        """A spec reading every input the encoding makes but those kept for older weights
        (encoding.SEQ_FREE_NOW)."""
        inputs: dict[str, object] = {
            "seq_free": SEQ_FREE_NOW,
            "seq_bad": SEQ_BAD,
            "static_free": STATIC_FREE,
            "static_bad": STATIC_BAD,
        }
        return NetSpec(**(inputs | kw))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, object]) -> NetSpec:
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list | tuple)}
        return NetSpec(**(dict(d) | tuples))  # type: ignore[arg-type]


@functools.cache
def _selection(spec: NetSpec) -> dict[str, slice | list[int]] | None:
    """NetSpec.read's index of each group, worked out once per spec (a decision reads them
    all): a slice where the columns lead the group's, None where it reads every column."""
    cols = {g: spec.columns(g) for g in GROUPS}
    if all(c == list(range(len(GROUPS[g]))) for g, c in cols.items()):
        return None
    return {g: slice(len(c)) if c == list(range(len(c))) else c for g, c in cols.items()}

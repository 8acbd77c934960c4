"""The council network's shape: what the torch model (council/torch_net.py) is built from and
the numpy forward (council/inference.py) reads, kept free of torch so that loading a council
to decide never imports it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, object]) -> NetSpec:
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list | tuple)}
        return NetSpec(**(dict(d) | tuples))  # type: ignore[arg-type]

"""Per-model speeds on gpu-agent's catalog types, from Gavel's measured throughputs:
benchmarks/gavel_speeds.toml, for `gpu-agent simulate --models`.

Gavel (Narayanan et al., OSDI'20, github.com/stanford-futuredata/gavel) measured 26 models
(model x batch size) alone on one K80, P100 and V100 (scheduler/simulation_throughputs.json,
the "null" entry of each model at scale factor 1). Those are not the catalog's types, so the
table is derived by one stated rule, not measured: a model's speed-up from K80 to V100, on a
log scale, over the mean of all 26 models' (its sensitivity s; 1 is the average model's, below
1 a model that gains less from a faster card, below 0 one that Gavel measured slower on the
V100, the recommendation models) bends the catalog's type averages around the A100 (speed 1):

    speed(model, type) = relative_throughput(type) ** s(model)

so the average model keeps the catalog's averages, and the spread between models is Gavel's.

    PYTHONPATH=. python benchmarks/gavel_speeds.py GAVEL/scheduler/simulation_throughputs.json \
        > benchmarks/gavel_speeds.toml
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path

from fleet.config import shipped_catalog

TYPES = ("T4", "V100", "A100", "H100", "RTX4090")


def sensitivities(throughputs: dict[str, dict[str, dict[str, object]]]) -> dict[str, float]:
    """Each model's log speed-up from K80 to V100, over the mean of all models'."""
    gains: dict[str, float] = {}
    for key, entry in throughputs["v100"].items():
        model, scale = ast.literal_eval(key)
        if scale != 1:
            continue
        v100, k80 = entry["null"], throughputs["k80"][key]["null"]
        assert isinstance(v100, float) and isinstance(k80, float)
        gains[model] = math.log(v100 / k80)
    mean = sum(gains.values()) / len(gains)
    return {m: g / mean for m, g in gains.items()}


def name(model: str) -> str:
    """'ResNet-18 (batch size 16)' -> 'resnet-18-bs16': a workload name (fleet.names)."""
    m = re.fullmatch(r"(.+) \(batch size (\d+)\)", model)
    base, batch = (m.group(1), f"-bs{m.group(2)}") if m else (model, "")
    return base.lower().replace(" ", "-") + batch


def main(path: str) -> None:
    catalog = shipped_catalog()
    print(
        "# Per-model speeds for `gpu-agent simulate --models`, derived from Gavel's measured\n"
        "# throughputs (OSDI'20; github.com/stanford-futuredata/gavel,\n"
        "# scheduler/simulation_throughputs.json) by benchmarks/gavel_speeds.py, whose\n"
        "# docstring gives the rule: speed = the catalog's relative_throughput ** s, s the\n"
        "# model's K80 -> V100 log speed-up over the mean model's. Derived, not measured on\n"
        "# these types.\n"
    )
    for model, s in sorted(sensitivities(json.loads(Path(path).read_text())).items()):
        print(f"[speeds.{name(model)}]  # {model}: s = {s:.3f}")
        for t in TYPES:
            print(f"{t} = {catalog[t].relative_throughput ** s:.4g}")
        print()


if __name__ == "__main__":
    main(sys.argv[1])

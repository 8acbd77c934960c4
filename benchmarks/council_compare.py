"""One council decision's numpy forward, another checkout's against this one's, in one process.

    .venv/bin/python benchmarks/council_compare.py OLD_CHECKOUT [--rounds 10]

OLD_CHECKOUT's council/inference.py and council/spec.py are loaded beside this checkout's
(the rest of the council is this checkout's), on the same shipped weights and the same 50
requests of 32 past events (tests/test_council_cfc.features, seeded), each timed with the old
forward and then the new, alternating, so that the machine's drift hits both. Prints the
largest logit difference, then the p50 of the forward alone and of `decide()` with each. A
checkout is a directory holding the project's packages, e.g. `git archive main | tar -x -C
/tmp/old`.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

# this file's folder holds council.py: the repository root goes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from council.encoding import encode_arrays
from council.neural_council import OCCLUSIONS, NeuralCouncil, with_occlusions
from fleet.config import CouncilSettings
from tests.test_council_cfc import features


def load(checkout: Path, name: str) -> ModuleType:
    """council/<name>.py of `checkout`, as a module of its own."""
    spec = importlib.util.spec_from_file_location(
        f"old_{name}", checkout / "council" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    new = NeuralCouncil.load()
    old_spec = load(args.old, "spec").NetSpec.from_dict(new.model.spec.to_dict())
    old_net = load(args.old, "inference").NumpyCouncilNet(old_spec, new.model.state)
    old = NeuralCouncil(old_net, new.temperature, new.vote_weights, new.name, new.band)
    rng = random.Random(4)
    batch = [features(rng, 32) for _ in range(50)]
    settings, rows = CouncilSettings(), 1 + len(OCCLUSIONS)
    encoded = [with_occlusions(encode_arrays([f])) for f in batch]
    worst = max(
        float(np.abs(old.model.logits(e, rows=rows) - new.model.logits(e, rows=rows)).max())
        for e in encoded
    )
    print(f"largest logit difference, old vs new, over {len(batch)} requests: {worst:.2e}")
    spent: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for f, enc in zip(batch, encoded, strict=True):
            for name, council in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                council.model.logits(enc, rows=rows)
                t1 = time.perf_counter()
                council.decide(f, settings)
                t2 = time.perf_counter()
                spent.setdefault(f"forward {name}", []).append((t1 - t0) * 1000)
                spent.setdefault(f"decide {name}", []).append((t2 - t1) * 1000)
    for key, times in spent.items():
        print(f"{key:12s} p50 {statistics.median(times):.3f} ms  (n={len(times)})")


if __name__ == "__main__":
    main()

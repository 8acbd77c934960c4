"""benchmarks/slurm_fidelity.py's machinery on a real Slurm 22.05: 20 Philly jobs, seconds
long, replayed on a private cluster that mirrors a small fleet (priority, backfill, node
weights and partitions as slurm-like models them) and through slurm-like on the same jobs.

Speed decides the figures (Slurm's clock is the real one), so the test asserts what does not
depend on it: every job started on both sides, the counts match, the settings reached Slurm,
and the agreement figures are well formed. Skips without Slurm or root, unless
GPU_AGENT_REQUIRE_SLURM=1 (the `slurm_cluster` fixture's rule)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from fleet.config import parse_fleet
from tests.slurmserver import SlurmServer

# The benchmark is a script, not a package module (`mypy tests benchmarks` knows it as
# `slurm_fidelity`); its folder goes last on the path so that it shadows no package.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from slurm_fidelity import (
    Options,
    Timing,
    first_node,
    kendall_tau,
    mirror,
    run,
    slurm_settings,
)

# Few GPUs, so that 20 jobs queue: the research jobs share 4 RTX4090s, training 8 A100 + 2 H100.
NODES = {"a100-0": ("A100", 8), "h100-0": ("H100", 2), "t4-0": ("T4", 1), "v100-0": ("V100", 1)}
NODES["rtx4090-0"] = ("RTX4090", 4)
FLEET = """
catalog = ["T4", "V100", "A100", "H100", "RTX4090"]

[pools]
training = ["A100", "H100"]
inference = ["T4", "V100"]
research = ["RTX4090"]

[limits]
max_duration_hours = 2160
""" + "".join(
    f'\n[[nodes]]\nname = "{n}"\ngpu_type = "{t}"\ngpus = {g}\n' for n, (t, g) in NODES.items()
)


def test_the_slurm_shape_mirrors_the_fleet() -> None:
    config = parse_fleet(FLEET)
    conf, scheduler = slurm_settings(config, Timing(120.0), longest=5)
    cluster = mirror(config, "nodes", conf)
    assert cluster.layout.partitions == {
        "t4-v100": ["t4-0", "v100-0"],
        "a100-h100": ["a100-0", "h100-0"],
        "rtx4090": ["rtx4090-0"],
    }
    assert cluster.layout.node_keys["h100-0"] == "Weight=2 Features=h100"
    assert cluster.nodes["a100-0"] == [("a100", 8)]
    # two hours of age at 120 x: one minute on Slurm, and the simulator gets that minute back
    assert conf["PriorityMaxAge"] == "1" and scheduler.age_max_hours == 2.0
    assert "bf_job_part_count_reserve=1" in conf["SchedulerParameters"]
    pooled = mirror(config, "pooled", conf)
    assert pooled.nodes["a100"] == [("a100", 8)] and pooled.node_type["h100"] == "H100"


def test_kendall_tau_and_host_lists() -> None:
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(2 * 3))
    assert math.isnan(kendall_tau([1, 1], [1, 2]))
    assert first_node("a100-[0-1]") == "a100-0"
    assert first_node("a100-[3,5]") == "a100-3"
    assert first_node("h100-1") == "h100-1"


def test_twenty_jobs_start_on_slurm_and_in_the_simulator(
    slurm_cluster: SlurmServer, tmp_path: Path
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    opts = Options(skip=22500, jobs=20, scale=120.0, fleet=fleet, timeout=120.0)
    r = run(opts, lambda _line: None)
    assert r["jobs"] + r["left_out"] == 20 and r["jobs"] >= 15
    assert len(r["per_job"]) == r["jobs"]
    states = r["slurm"]["states"]
    assert sum(states.values()) == r["jobs"] and "PENDING" not in states
    assert r["sim"]["killed"] == r["sim_fair_share"]["killed"] == 0
    for row in r["per_job"]:
        for side in ("slurm", "sim", "sim_fair_share"):
            start, gpu_type = row[side]
            assert start >= row["submit"] and gpu_type in ("T4", "V100", "A100", "H100", "RTX4090")
    for key in ("agreement", "agreement_fair_share"):
        a = r[key]
        assert a["jobs"] == r["jobs"]
        assert -1.0 <= a["tau_start"] <= 1.0
        assert a["wait_mean_abs_diff_min"] >= 0 and 0 <= a["same_type"] <= 1
    # fair share needs slurmdbd: without it, no pending job's priority has a fair-share part
    assert r["slurm"]["pending_priority"][1] <= int(r["slurm_conf"]["PriorityWeightAge"])

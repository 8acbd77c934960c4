"""The private Slurm 22.05 cluster the fixtures start (tests/slurmserver.py): node gn1 with 4
A100 and 4 H100 GRES, node gn2 with 2 H100, one partition `gpu`."""

from __future__ import annotations

import os
import subprocess
import time

from tests.slurmserver import SlurmServer, scratch_root


def test_a_cluster_starts_well_under_a_minute_and_stops_clean(slurm: SlurmServer) -> None:
    other = SlurmServer(scratch_root(), {"x1": [("h100", 1)]})
    began = time.monotonic()
    try:
        env = other.start()
        took = time.monotonic() - began
        held = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--output=/dev/null",
                "--gres=gpu:h100:1",
                "--wrap=exec sleep 60",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        assert held.stdout.strip().isdigit()
        assert len(other.pids()) == 3  # munged, slurmctld, one slurmd
    finally:
        other.stop()
    assert took < 20, took
    assert other.pids() == [] and other.leftovers() == []


def test_the_session_cluster_schedules_typed_gpu_jobs(slurm: SlurmServer) -> None:
    submit = ["sbatch", "--parsable", "--output=/dev/null", "--gres=gpu:h100:2", "--nodelist=gn1"]
    job = subprocess.run(
        [*submit, "--wrap=exec sleep 60"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deadline = time.monotonic() + 20
    state = ["squeue", "--noheader", f"--jobs={job}", "--format=%T"]
    while subprocess.run(state, capture_output=True, text=True).stdout.strip() != "RUNNING":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.1)
    seen = subprocess.run(
        ["srun", f"--jobid={job}", "sh", "-c", "echo $SLURM_GPUS_ON_NODE"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert seen.stdout.strip() == "2", seen.stderr

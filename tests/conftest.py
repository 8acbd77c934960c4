"""Shared fixtures: a small fleet, orchestrators on virtual time, and a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fleet.clock import VirtualClock
from fleet.config import FleetConfig, parse_fleet
from graph.orchestrator import Orchestrator
from nodes.context import Services, open_services

if TYPE_CHECKING:
    from tests.slurmserver import SlurmServer

SMALL_FLEET = """
catalog = ["A100", "H100", "T4", "RTX4090"]

[pools]
training = ["A100", "H100"]
inference = ["T4"]
research = ["RTX4090"]

[[nodes]]
name = "a100-0"
gpu_type = "A100"
gpus = 4
rack = "rack-a"

[[nodes]]
name = "a100-1"
gpu_type = "A100"
gpus = 4
rack = "rack-b"

[[nodes]]
name = "h100-0"
gpu_type = "H100"
gpus = 2
rack = "rack-a"

[[nodes]]
name = "t4-0"
gpu_type = "T4"
gpus = 2
rack = "rack-b"
nvlink = false

[[nodes]]
name = "rtx-0"
gpu_type = "RTX4090"
gpus = 2
rack = "rack-b"
nvlink = false
"""

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def small_config(**sections: Any) -> FleetConfig:
    """The small fleet, with sections replaced field by field (e.g. monitor={"tick_seconds": 5})."""
    base = parse_fleet(SMALL_FLEET)
    update = {}
    for name, fields in sections.items():
        current = getattr(base, name)
        update[name] = (
            current.model_copy(update=fields) if hasattr(current, "model_copy") else fields
        )
    return base.model_copy(update=update)


def fleet_toml(**sections: dict[str, Any]) -> str:
    """SMALL_FLEET plus extra TOML sections (written as `[name]` tables of scalars)."""
    extra = []
    for name, fields in sections.items():
        extra.append(f"\n[{name}]")
        extra += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return SMALL_FLEET + "\n".join(extra) + "\n"


@pytest.fixture
def config() -> FleetConfig:
    return small_config()


@pytest.fixture
def services(tmp_path: Path, config: FleetConfig) -> Iterator[Services]:
    svc = open_services(tmp_path / "state", config, clock=VirtualClock())
    yield svc
    svc.close()


OrchFactory = Callable[..., Orchestrator]


@pytest.fixture
def make_orch(tmp_path: Path) -> Iterator[OrchFactory]:
    opened: list[Orchestrator] = []

    def make(
        config: FleetConfig | None = None, *, clock: Any = None, name: str = "state", **kwargs: Any
    ) -> Orchestrator:
        orch = Orchestrator(
            tmp_path / name, config or small_config(), clock=clock or VirtualClock(), **kwargs
        )
        opened.append(orch)
        return orch

    yield make
    for orch in opened:
        orch.close()


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP: state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real `gpu-agent` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "graph.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(*args: str) -> int:
    """`gpu-agent ARGS` in this process (graph.cli.main), its exit code (argparse's refusals
    exit): for checks of many refusals, where an interpreter apiece costs more than they do."""
    from graph.cli import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


def add_token(
    cwd: Path, state_dir: Path, name: str, role: str, project: str | None, by: str | None
) -> str:
    """`gpu-agent token add` through the real CLI, as the holder of token `by` (None: the
    local admin, before any token exists): the new token."""
    extra = ["--project", project] if project else []
    r = run_cli(
        "token", "add", name, "--role", role, *extra, "--json", "--state-dir", str(state_dir),
        cwd=cwd, env={"GPU_AGENT_TOKEN": by or ""},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["token"])


# ---- PostgreSQL ------------------------------------------------------------------------------
# A real server on loopback: GPU_AGENT_TEST_DATABASE (an admin URL) if set, else a private one
# started here (tests/pgserver.py). Without PostgreSQL installed the Postgres cases skip, unless
# GPU_AGENT_REQUIRE_POSTGRES=1 (.ci/run sets it) makes that a failure.


@pytest.fixture(scope="session")
def pg_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.pgserver import PgServer, bindir

    given = os.environ.get("GPU_AGENT_TEST_DATABASE")
    if given:
        yield given
        return
    if bindir() is None:
        if os.environ.get("GPU_AGENT_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required (GPU_AGENT_REQUIRE_POSTGRES) but not installed")
        pytest.skip("PostgreSQL is not installed")
    server = PgServer(Path(f"/tmp/gpu-agent-pg-{os.getpid()}"))
    try:
        yield server.start()
    finally:
        server.stop()
        import shutil

        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    from tests.pgserver import create_database, drop_database

    url = create_database(pg_admin)
    yield url
    drop_database(pg_admin, url)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a ledger lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    return str(request.getfixturevalue("pg_url"))


# ---- Slurm -----------------------------------------------------------------------------------
# A real cluster on loopback (tests/slurmserver.py: munged, slurmctld, two slurmds, as root):
# GPU_AGENT_TEST_SLURM_CONF (its slurm.conf) if set, else one started here for the session.
# Without Slurm installed, or not as root, the Slurm tests skip, unless GPU_AGENT_REQUIRE_SLURM=1
# (.ci/run sets it) makes that a failure.


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmServer]:
    from tests.slurmserver import SlurmServer, installed, scratch_root

    given = os.environ.get("GPU_AGENT_TEST_SLURM_CONF")
    if given:
        yield SlurmServer(Path(given).parent)
        return
    why = (
        "Slurm is not installed (slurmctld slurmd slurm-client munge)"
        if not installed()
        else "the test Slurm cluster runs as root"
        if os.geteuid() != 0
        else None
    )
    if why is not None:
        if os.environ.get("GPU_AGENT_REQUIRE_SLURM"):
            pytest.fail(f"Slurm is required (GPU_AGENT_REQUIRE_SLURM) but {why}")
        pytest.skip(why)
    server = SlurmServer(scratch_root())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster: SlurmServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlurmServer]:
    """The cluster for one test (SLURM_CONF names it); left as started: no job, nodes idle."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    yield slurm_cluster
    slurm_cluster.reset()

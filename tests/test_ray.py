"""The Ray backend on a real local Ray cluster: a head and a second node process with logical
GPUs of different accelerator types (ray.cluster_utils.Cluster, Ray's own test harness).
Allocations through the graph become placement groups; release removes them; a restart
reconciles what a crashed worker left."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.placement_group import placement_group_table  # noqa: E402

from fleet.clock import VirtualClock  # noqa: E402
from fleet.config import FleetConfig, load_fleet  # noqa: E402
from fleet.models import ReleaseReason, Status  # noqa: E402
from fleet.ray_backend import PREFIX, RayFleet, node_of  # noqa: E402
from graph.orchestrator import Orchestrator  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 2, "resources": {"accelerator_type:A100": 2}},
    )
    c.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:A100": 2})
    c.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:H100": 2})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="gpu-agent")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def config() -> FleetConfig:
    return load_fleet(hardware=True)


def groups() -> dict[str, dict[str, Any]]:
    return {
        g["name"].removeprefix(PREFIX): g
        for g in placement_group_table().values()
        if g["name"].startswith(PREFIX) and g["state"] != "REMOVED"
    }


def orchestrator(tmp_path: Path, config: FleetConfig, clock: VirtualClock) -> Orchestrator:
    return Orchestrator(tmp_path / "state", config, backend=RayFleet(config), clock=clock)


def ask(gpu_type: str, count: int, hours: float = 1) -> dict[str, Any]:
    return {
        "project": "vision",
        "purpose": "training",
        "gpu_type": gpu_type,
        "count": count,
        "duration_hours": hours,
    }


def test_the_inventory_is_the_clusters_gpu_nodes(cluster: Cluster, config: FleetConfig) -> None:
    inv = RayFleet(config).inventory()
    by_type: dict[str, set[str]] = {}
    for g in inv:
        by_type.setdefault(g.gpu_type, set()).add(g.node)
    assert {t: len(nodes) for t, nodes in by_type.items()} == {"A100": 2, "H100": 1}
    assert len(inv) == 6 and all(g.uuid.startswith("ray:") for g in inv)


def test_an_allocation_is_a_placement_group_until_released(
    cluster: Cluster, config: FleetConfig, tmp_path: Path
) -> None:
    with orchestrator(tmp_path, config, VirtualClock()) as orch:
        placed = orch.request(ask("H100", 2), wait=False)
        assert placed.status is Status.ALLOCATED and placed.allocation is not None
        aid = placed.allocation.id
        group = groups()[aid]
        assert group["strategy"] == "STRICT_PACK" and group["state"] == "CREATED"
        (node,) = {node_of(g) for g in placed.allocation.gpu_ids}
        assert set(group["bundles_to_node_id"].values()) == {node}
        assert ray.available_resources().get("accelerator_type:H100") == 2  # type resource
        assert ray.available_resources().get("GPU", 0) == 4  # 2 of 6 reserved
        done = orch.resume(placed.thread_id)  # the monitor runs to the lease's end
        assert done.status is Status.RELEASED
        assert aid not in groups()


def test_a_request_across_nodes_is_packed(
    cluster: Cluster, config: FleetConfig, tmp_path: Path
) -> None:
    with orchestrator(tmp_path, config, VirtualClock()) as orch:
        placed = orch.request(ask("A100", 3), wait=False)
        assert placed.allocation is not None and len(placed.allocation.nodes) == 2
        group = groups()[placed.allocation.id]
        assert group["strategy"] == "PACK"
        assert len(set(group["bundles_to_node_id"].values())) == 2
        orch.release(placed.allocation.id)
        assert placed.allocation.id not in groups()  # an explicit release frees it at once


def test_a_restart_reconciles_what_a_crashed_worker_left(
    cluster: Cluster, config: FleetConfig, tmp_path: Path
) -> None:
    clock = VirtualClock()
    with orchestrator(tmp_path, config, clock) as orch:
        kept = orch.request(ask("A100", 1), wait=False)
        ended = orch.request(ask("H100", 1), wait=False)
        assert kept.allocation is not None and ended.allocation is not None
        # the crash: the ledger says one ended, its group is still there; the other's group
        # is gone (a worker died between the ledger and Ray)
        orch.services.ledger.release(ended.allocation.id, ReleaseReason.EXPLICIT, clock.now())
        orch.services.backend.free(kept.allocation.id)  # type: ignore[attr-defined]
        assert ended.allocation.id in groups() and kept.allocation.id not in groups()
    with orchestrator(tmp_path, config, clock) as orch:  # the restart
        live = groups()
        assert kept.allocation.id in live and ended.allocation.id not in live
        orch.release(kept.allocation.id)
    assert not groups()


def test_an_address_ray_cannot_read_is_one_line(tmp_path: Path) -> None:
    """RAY_ADDRESS=bogus::: (an attacker's pass, 2026-12-06): one line and exit 2, not Ray's
    ValueError as a traceback; the state directory the request would have made is not left
    behind."""
    from tests.conftest import run_cli

    done = run_cli(
        "request", "--backend", "ray", "--state-dir", str(tmp_path / "s"), "--project", "p",
        "--purpose", "training", "--count", "1", "--hours", "1", "--no-wait",
        cwd=tmp_path, env={"RAY_ADDRESS": "bogus:::"},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Ray address 'bogus:::': Invalid address format" in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()
    (tmp_path / "mine").mkdir()  # a directory the opening did not make is never taken away
    done = run_cli(
        "request", "--backend", "ray", "--state-dir", str(tmp_path / "mine"), "--project",
        "p", "--purpose", "training", "--count", "1", "--hours", "1", "--no-wait",
        cwd=tmp_path, env={"RAY_ADDRESS": "bogus:::"},
    )  # fmt: skip
    assert done.returncode == 2 and (tmp_path / "mine").is_dir()

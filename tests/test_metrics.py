"""The Prometheus exporter: DCGM names and labels, the ledger's gauges, the CLI's server, and
its Host check (a DNS-rebinding page elsewhere reads nothing)."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fleet.config import FleetConfig
from fleet.errors import InvalidInput
from fleet.models import GPUInfo, GPUSample, Status, utc
from graph.metrics import DCGM_LABELS, registry_for, serve
from nodes.context import open_services
from tests.conftest import ROOT, SMALL_FLEET, OrchFactory, add_token, run_cli, small_config


def parse(text: str) -> dict[str, list[Sample]]:
    """Sample name -> its samples (a counter's samples carry the _total suffix)."""
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def scrape(url: str) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return parse(response.read().decode())


def one(samples: list[Sample], **labels: str) -> float:
    [value] = [s.value for s in samples if labels.items() <= s.labels.items()]
    return value


def get(port: int, *hosts: str) -> tuple[int, str]:
    """GET /metrics from 127.0.0.1:port with exactly these Host headers (none: no Host)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/metrics", skip_host=True)
        for host in hosts:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_scrape_over_loopback(make_orch: OrchFactory) -> None:
    orch = make_orch()
    svc = orch.services
    held = orch.request(
        {
            "project": "vision",
            "purpose": "training",
            "count": 2,
            "duration_hours": 2,
            "type": "A100",
        },
        wait=False,
    )
    gone = orch.request(
        {"project": "nlp", "purpose": "training", "count": 1, "duration_hours": 1, "type": "H100"},
        wait=False,
    )
    assert held.status is Status.ALLOCATED and gone.status is Status.ALLOCATED
    assert held.allocation is not None and gone.allocation is not None
    orch.release(gone.allocation.id)
    orch.set_budget("vision", 100.0)
    now = svc.clock.now()
    free = next(g for g in svc.inventory if g.uuid not in held.allocation.gpu_ids)
    svc.ledger.mark_unhealthy({free.uuid: "XID 79"}, now)

    with serve(svc, "127.0.0.1", 0) as server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        m = scrape(server.url)

    util = m["DCGM_FI_DEV_GPU_UTIL"]
    assert len(util) == len(svc.inventory)
    by_uuid = {s.labels["UUID"]: s.labels for s in util}
    assert set(by_uuid) == {g.uuid for g in svc.inventory}
    for gpu in svc.inventory:
        labels = by_uuid[gpu.uuid]
        assert set(labels) == set(DCGM_LABELS)
        assert labels == {
            "gpu": str(gpu.index),
            "UUID": gpu.uuid,
            "device": f"nvidia{gpu.index}",
            "modelName": gpu.gpu_type,
            "Hostname": gpu.node,
            "pci_bus_id": "",
        }

    uuid = held.allocation.gpu_ids[0]
    [sample] = svc.backend.sample([uuid], now, {uuid: "vision"})
    assert sample.mem_used_gb is not None and sample.mem_total_gb is not None
    assert one(m["DCGM_FI_DEV_FB_USED"], UUID=uuid) == pytest.approx(sample.mem_used_gb * 1024)
    assert one(m["DCGM_FI_DEV_FB_FREE"], UUID=uuid) == pytest.approx(
        (sample.mem_total_gb - sample.mem_used_gb) * 1024
    )
    assert "DCGM_FI_DEV_SM_CLOCK" not in m  # the simulated fleet reports no clocks

    assert one(m["gpu_agent_allocations"], state="active") == 1
    assert one(m["gpu_agent_allocations"], state="released") == 1
    assert one(m["gpu_agent_queue_length"]) == 0
    costs = {c.project: c for c in orch.costs()}
    assert {s.labels["project"] for s in m["gpu_agent_spend_usd"]} == set(costs)
    for project, cost in costs.items():
        assert one(m["gpu_agent_spend_usd"], project=project) == pytest.approx(cost.spent_usd)
    assert one(m["gpu_agent_budget_usd"], project="vision") == 100.0
    assert [s.labels["project"] for s in m["gpu_agent_budget_usd"]] == ["vision"]
    assert one(m["gpu_agent_releases_total"], reason="explicit") == 1
    assert {s.labels["UUID"] for s in m["gpu_agent_gpu_held"]} == set(held.allocation.gpu_ids)
    assert one(m["gpu_agent_gpu_held"], UUID=uuid) == 1
    index = {g.uuid: g.index for g in svc.inventory}
    assert m["gpu_agent_gpu_held"][0].labels.keys() == {"gpu", "UUID", "project", "allocation_id"}
    assert {
        (s.labels["gpu"], s.labels["project"], s.labels["allocation_id"])
        for s in m["gpu_agent_gpu_held"]
    } == {(str(index[g]), "vision", held.allocation.id) for g in held.allocation.gpu_ids}
    [bad] = m["gpu_agent_gpu_unhealthy"]
    assert bad.labels == {"UUID": free.uuid, "reason": "XID 79"} and bad.value == 1


def test_a_forged_host_is_refused(make_orch: OrchFactory) -> None:
    """A page on evil.example that rebinds its name to 127.0.0.1: the browser sends
    Host: evil.example[:port]. The metrics answer it one line (421), as the web page does, and
    name no GPU, project or allocation; the loopback names and the allowed ones are served."""
    orch = make_orch()
    with serve(orch.services, "127.0.0.1", 0, allowed=["Prom.example"]) as server:
        assert server.hosts == {"127.0.0.1", "localhost", "::1", "prom.example"}
        for sent in (
            ["evil.example"],
            ["evil.example:9400"],
            ["127.0.0.1.evil.example"],
            ["127.0.0.1@evil.example"],
            ["evil.example:80, 127.0.0.1"],
            ["127.0.0.1", "evil.example"],
            [""],
            [],
        ):
            status, text = get(server.port, *sent)
            assert status == 421 and text.endswith("\n") and text.count("\n") == 1, (sent, text)
            assert "not served under host" in text and "serve-metrics --allow-host" in text
            assert "DCGM" not in text and "gpu_agent" not in text
        for host in ("127.0.0.1", f"127.0.0.1:{server.port}", "LOCALHOST:9400", "[::1]:9400"):
            status, text = get(server.port, host)
            assert status == 200 and "gpu_agent_queue_length 0.0" in text, host
        assert get(server.port, "prom.example:9400")[0] == 200
    with pytest.raises(InvalidInput, match=r"host name 'http://prom\.example/'"):
        serve(orch.services, "127.0.0.1", 0, allowed=["http://prom.example/"])


class NoTempFleet:
    """A fleet whose GPUs cannot report their temperature or memory clock."""

    name = "no-temp"
    hardware = False

    def __init__(self, config: FleetConfig) -> None:
        self._inventory = [
            GPUInfo(
                uuid=f"GPU-{node.name}-{i}",
                gpu_type=node.gpu_type,
                node=node.name,
                index=i,
                memory_gb=config.catalog[node.gpu_type].memory_gb,
                model_name=f"NVIDIA {node.gpu_type}",
                pci_bus_id=f"00000000:{i + 1:02X}:00.0",
            )
            for node in config.nodes
            for i in range(node.gpus)
        ]

    def inventory(self) -> list[GPUInfo]:
        return list(self._inventory)

    def sample(self, gpu_ids: list[str], now: float, holders: Mapping[str, str]) -> list[GPUSample]:
        return [
            GPUSample(
                gpu_id=g,
                at=utc(now),
                util_pct=42.0,
                mem_used_gb=10.0,
                mem_total_gb=80.0,
                temp_c=None,
                power_w=100.0,
                sm_clock_mhz=1410.0,
            )
            for g in gpu_ids
        ]

    def throttle(self, gpu_id: str) -> str:
        return "nothing to do"

    def unhealthy(self) -> dict[str, str]:
        return {}

    def steady_until(self, gpu_ids: list[str], at: float) -> float:
        return at

    def reset(self, gpu_ids: list[str]) -> None:
        pass


def test_a_field_the_gpu_cannot_report_is_not_exported(make_orch: OrchFactory) -> None:
    config = small_config()
    orch = make_orch(config, backend=NoTempFleet(config))
    m = parse(generate_latest(registry_for(orch.services)).decode())
    n = len(orch.services.inventory)
    assert "DCGM_FI_DEV_GPU_TEMP" not in m and "DCGM_FI_DEV_MEM_CLOCK" not in m
    assert len(m["DCGM_FI_DEV_GPU_UTIL"]) == len(m["DCGM_FI_DEV_SM_CLOCK"]) == n
    assert all(s.value == 42.0 for s in m["DCGM_FI_DEV_GPU_UTIL"])
    assert one(m["DCGM_FI_DEV_FB_FREE"], UUID="GPU-a100-0-1") == 70 * 1024
    [power] = [s for s in m["DCGM_FI_DEV_POWER_USAGE"] if s.labels["UUID"] == "GPU-a100-0-1"]
    assert power.value == 100.0 and power.labels == {
        "gpu": "1",
        "UUID": "GPU-a100-0-1",
        "device": "nvidia1",
        "modelName": "NVIDIA A100",
        "Hostname": "a100-0",
        "pci_bus_id": "00000000:02:00.0",
    }


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET)
    state = tmp_path / "state"
    open_services(state, str(fleet)).close()  # the command opens an existing state dir
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graph.cli",
            "serve-metrics",
            "--state-dir",
            str(state),
            "--fleet",
            str(fleet),
            "--port",
            "0",
            "--allow-host",
            "prom.example",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("serving metrics on http://127.0.0.1:"), line
        url = line.removeprefix("serving metrics on ")
        m = scrape(url)
        assert len(m["DCGM_FI_DEV_GPU_UTIL"]) == 14  # the small fleet's GPUs
        assert one(m["gpu_agent_allocations"], state="active") == 0
        port = int(url.removesuffix("/metrics").rsplit(":", 1)[1])
        assert get(port, "prom.example:9400")[0] == 200  # --allow-host
        assert get(port, "evil.example:9400")[0] == 421
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err


def test_a_members_token_may_not_serve_every_projects_metrics(tmp_path: Path) -> None:
    """The metrics are the fleet's, every project's spend, budgets and allocation ids, where
    a member's `status` and `costs` show its own project's: serving them needs an admin."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET)
    state = tmp_path / "state"
    root = add_token(tmp_path, state, "root", "admin", None, None)
    bob = add_token(tmp_path, state, "bob", "member", "speech", root)
    open_services(state, str(fleet)).close()  # the command opens an existing state dir
    opts = ["--state-dir", str(state), "--fleet", str(fleet), "--port", "0", "--json"]
    r = run_cli("serve-metrics", *opts, cwd=tmp_path, env={"GPU_AGENT_TOKEN": bob}, timeout=60)
    assert r.returncode == 5 and r.stderr.count("\n") == 1, r.stderr
    assert "bob (member) may not serve the metrics" in r.stderr
    assert json.loads(r.stdout)["type"] == "Forbidden"


def test_a_bad_allowed_host_is_refused_before_anything_opens(tmp_path: Path) -> None:
    """As `gpu-agent ui --allow-host`: one line, exit 2, no state directory opened."""
    missing = tmp_path / "never"
    r = run_cli("serve-metrics", "--state-dir", str(missing), "--allow-host", "a/b", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "host name 'a/b'" in r.stderr and not missing.exists()

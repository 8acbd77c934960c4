"""A Prometheus exporter for the fleet and the ledger.

Why these names: the GPU readings are exported under the names, units, help texts and labels
of NVIDIA's DCGM exporter (DCGM_FI_DEV_GPU_UTIL in %, DCGM_FI_DEV_FB_USED in MiB, ...; labels
gpu, UUID, device, modelName, Hostname, pci_bus_id), so the Grafana dashboards written for
dcgm-exporter work unchanged on gpu-agent, simulated fleet included. A reading the device could
not give (None in `GPUSample`) is left out for that GPU, never exported as 0 or NaN: a gap in
a graph is honest, a zero is a lie.

Why one sample per scrape: metrics are collected when Prometheus asks, not on a timer of our
own, and every GPU is read exactly once per scrape (one `backend.sample` call), so a scrape
costs one pass over the devices and all of its series describe the same instant.

Beside the DCGM series, the allocator's own state, read from the ledger (the source of truth),
in Prometheus base units:

    gpu_agent_allocations{state}            allocations per state (queued, active, released)
    gpu_agent_queue_length                  allocations waiting for GPUs
    gpu_agent_spend_usd{project}            charged so far, in US dollars
    gpu_agent_budget_usd{project}           the budget, for projects that have one
    gpu_agent_releases_total{reason}        finished allocations per release reason
    gpu_agent_gpu_held{gpu,UUID,project,allocation_id}  1 for every held GPU
    gpu_agent_gpu_unhealthy{UUID,reason}    1 for every GPU out of placement
    gpu_agent_unmonitored{project,allocation_id,state}  1 for every live allocation that no
                                            process monitors (fleet.monitors): alert on it

`registry_for`, `wsgi_app` and `asgi_app` let another server mount the metrics; `serve` runs
a threaded HTTP server as prometheus_client's own, but answering only to the Host names it
serves (graph.hosts, the web page's check: a page on another site that rebinds its DNS name
to this address reads nothing); `serve_until_signalled` is what `gpu-agent serve-metrics` runs.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from types import FrameType
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import make_asgi_app, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from fleet.models import GPUInfo, GPUSample
from fleet.monitors import Monitors
from graph.hosts import allowed_hosts, host_refusal, served_host
from nodes.context import Services

MIB_PER_GIB = 1024.0
DCGM_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id")

# name, help, how to read it (in DCGM's unit) from a sample; None: not reported
_DCGM: tuple[tuple[str, str, Callable[[GPUSample], float | None]], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda s: s.util_pct),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda s: s.temp_c),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda s: s.power_w),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        lambda s: None if s.mem_used_gb is None else s.mem_used_gb * MIB_PER_GIB,
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        lambda s: (
            None
            if s.mem_used_gb is None or s.mem_total_gb is None
            else max(0.0, s.mem_total_gb - s.mem_used_gb) * MIB_PER_GIB
        ),
    ),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda s: s.sm_clock_mhz),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", lambda s: s.mem_clock_mhz),
)


def dcgm_labels(gpu: GPUInfo) -> list[str]:
    """The DCGM exporter's label values for one GPU, in DCGM_LABELS' order."""
    return [
        str(gpu.index),
        gpu.uuid,
        f"nvidia{gpu.index}",
        gpu.model_name or gpu.gpu_type,
        gpu.node,
        gpu.pci_bus_id or "",
    ]


class _LedgerFamilies(NamedTuple):
    allocations: GaugeMetricFamily
    queue: GaugeMetricFamily
    spend: GaugeMetricFamily
    budget: GaugeMetricFamily
    releases: CounterMetricFamily
    held: GaugeMetricFamily
    unhealthy: GaugeMetricFamily
    unmonitored: GaugeMetricFamily


def _dcgm_families() -> list[GaugeMetricFamily]:
    return [GaugeMetricFamily(name, doc, labels=DCGM_LABELS) for name, doc, _ in _DCGM]


def _ledger_families() -> _LedgerFamilies:
    return _LedgerFamilies(
        allocations=GaugeMetricFamily(
            "gpu_agent_allocations", "Allocations in the ledger per state.", labels=["state"]
        ),
        queue=GaugeMetricFamily("gpu_agent_queue_length", "Allocations queued for GPUs."),
        spend=GaugeMetricFamily(
            "gpu_agent_spend_usd", "Charged to the project so far, in USD.", labels=["project"]
        ),
        budget=GaugeMetricFamily(
            "gpu_agent_budget_usd", "The project's budget, in USD.", labels=["project"]
        ),
        releases=CounterMetricFamily(
            "gpu_agent_releases",
            "Finished allocations per release reason (idle, "
            "lease-expired, budget, unhealthy, explicit, ...).",
            labels=["reason"],
        ),
        held=GaugeMetricFamily(
            "gpu_agent_gpu_held",
            "1 for every GPU an allocation holds.",
            labels=["gpu", "UUID", "project", "allocation_id"],
        ),
        unhealthy=GaugeMetricFamily(
            "gpu_agent_gpu_unhealthy",
            "1 for every GPU taken out of placement (an XID error, a lost GPU).",
            labels=["UUID", "reason"],
        ),
        unmonitored=GaugeMetricFamily(
            "gpu_agent_unmonitored",
            "1 for every live allocation no process monitors (its "
            "monitor stopped beating): idle release and the lease are not enforced until a "
            "worker or `gpu-agent resume` adopts it.",
            labels=["project", "allocation_id", "state"],
        ),
    )


class FleetCollector(Collector):
    """Reads every GPU once and the ledger once per scrape; see the module docstring."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets a registry spot clashing names and serve
        `?name[]=` filters without sampling the GPUs."""
        yield from _dcgm_families()
        yield from _ledger_families()

    def collect(self) -> Iterator[Metric]:
        svc = self.services
        now = svc.clock.now()
        holders = svc.ledger.holders()
        samples = svc.sample(
            [g.uuid for g in svc.gpus], now, {g: project for g, (_, project) in holders.items()}
        )
        dcgm = _dcgm_families()
        for gpu, sample in zip(svc.gpus, samples, strict=True):
            labels = dcgm_labels(gpu)
            for family, (_, _, read) in zip(dcgm, _DCGM, strict=True):
                value = read(sample)
                if value is not None:
                    family.add_metric(labels, value)
        yield from dcgm

        m = _ledger_families()
        counts = svc.ledger.counts_by_state()
        for state, n in counts.items():
            m.allocations.add_metric([state], n)
        m.queue.add_metric([], counts.get("queued", 0))
        for cost in svc.ledger.costs(now):
            m.spend.add_metric([cost.project], cost.spent_usd)
            if cost.budget_usd is not None:
                m.budget.add_metric([cost.project], cost.budget_usd)
        for reason, n in svc.ledger.releases_by_reason().items():
            m.releases.add_metric([reason], n)
        index = {g.uuid: str(g.index) for g in svc.gpus}
        for uuid, (aid, project) in sorted(holders.items()):
            m.held.add_metric([index.get(uuid, ""), uuid, project, aid], 1)
        for uuid, reason in svc.check_health().items():
            m.unhealthy.add_metric([uuid, reason], 1)
        for orphan in Monitors(svc.ledger).orphans():
            m.unmonitored.add_metric([orphan.row.project, orphan.row.id, orphan.row.state], 1)
        yield from m


def registry_for(services: Services) -> CollectorRegistry:
    """A fresh registry holding only the fleet collector (no process or platform metrics)."""
    registry = CollectorRegistry()
    registry.register(FleetCollector(services))
    return registry


def wsgi_app(services: Services) -> WSGIApplication:
    """A WSGI app serving the metrics (any path), to mount in another WSGI server."""
    app: WSGIApplication = make_wsgi_app(registry_for(services))
    return app


ASGIApp = Callable[
    [
        dict[str, Any],
        Callable[[], Awaitable[dict[str, Any]]],
        Callable[[dict[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


def asgi_app(services: Services) -> ASGIApp:
    """An ASGI app serving the metrics, e.g. mounted at /metrics in a Starlette app."""
    app: ASGIApp = make_asgi_app(registry_for(services))
    return app


def host_checked(app: WSGIApplication, hosts: frozenset[str]) -> WSGIApplication:
    """`app` for requests whose one Host header names one of `hosts`; any other gets one line
    (421), as the web page answers it: no DNS-rebinding page reads the fleet's metrics."""

    def checked(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # wsgiref joins two Host headers with a comma: no single host, refused as the page does
        sent = [environ["HTTP_HOST"]] if "HTTP_HOST" in environ else []
        if served_host(sent, hosts) is not None:
            return app(environ, start_response)
        how = "`gpu-agent serve-metrics --allow-host NAME`"
        body = host_refusal(sent, "the metrics are", how).encode()
        start_response(
            "421 Misdirected Request",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return checked


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per scrape, as prometheus_client's server; daemon threads, so that a scrape in
    flight never holds the process up at exit."""

    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    """Logs no request: a scrape every few seconds is no news (as prometheus_client's)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bound(host: str, port: int, app: WSGIApplication) -> WSGIServer:
    """A server for `app` bound to host:port, on an IPv6 socket for an IPv6 address. OSError
    (socket.gaierror included) where it cannot bind."""
    family, *_, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = _Server6 if family == socket.AF_INET6 else _Server
    return make_server(str(address[0]), port, app, server_class, _Quiet)


@dataclass
class MetricsServer:
    """The metrics' HTTP server running in a daemon thread."""

    host: str
    port: int  # the bound port (the one the system chose when asked for 0)
    hosts: frozenset[str]  # the Host names it answers to
    server: WSGIServer = field(repr=False)
    thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, free the port and wait for the thread. Idempotent."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join()
        self.server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    services: Services, host: str = "127.0.0.1", port: int = 9400, allowed: Iterable[str] = ()
) -> MetricsServer:
    """Serve the metrics at http://host:port/metrics in a thread; port 0: any free port. They
    answer to a Host of the loopback names, `host` and the `allowed` names only (InvalidInput
    for a name that is none, before anything binds)."""
    hosts = allowed_hosts([host, *allowed])
    server = _bound(host, port, host_checked(make_wsgi_app(registry_for(services)), hosts))
    thread = threading.Thread(target=server.serve_forever, name="gpu-agent-metrics", daemon=True)
    thread.start()
    return MetricsServer(
        host=host, port=int(server.server_address[1]), hosts=hosts, server=server, thread=thread
    )


def serve_until_signalled(
    services: Services,
    host: str = "127.0.0.1",
    port: int = 9400,
    on_ready: Callable[[MetricsServer], None] | None = None,
    *,
    allowed: Iterable[str] = (),
) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly and return (main thread only).

    The handlers go in before the server starts, so a signal that arrives once `on_ready`
    has announced the port always ends here with a clean return; the old handlers are put
    back on the way out."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with serve(services, host, port, allowed) as server:
            if on_ready is not None:
                on_ready(server)
            while not stop.wait(1.0):
                pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""The commands that serve until stopped: the web page (`ui`), a worker that runs submitted
requests (`worker`), LangGraph's dev server for Studio (`studio`) and the Prometheus exporter
(`serve-metrics`). What each serves with is imported when it starts."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from fleet.errors import InvalidInput
from graph.cli_common import backend_choice, database_url, emit, fleet_file, open_orchestrator


def cmd_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from graph.hosts import allowed_hosts
    from graph.orchestrator import Orchestrator
    from graph.ui import SERVER, create_app, hosts_from_env

    if not 0 < args.port < 65536:
        raise InvalidInput(f"--port must be 1-65535, not {args.port}")
    extra = [args.host, *(args.allow_host or hosts_from_env())]
    hosts = allowed_hosts(extra)  # checked before anything opens
    try:  # a port taken, or a host that is not this machine's: before anything opens
        _bind(args.host, args.port)
    except OSError as exc:
        raise InvalidInput(
            f"cannot serve the page on {url_host(args.host)}:{args.port}: {exc.strerror or exc}"
        ) from None
    orch = Orchestrator(  # a missing state directory is refused, as `status` refuses it
        args.state_dir,
        fleet_file(args),
        backend=backend_choice(args),
        create=False,
        database=database_url(args),
        identity=SERVER,
        monitor_kind="page",
    )
    print(
        f"gpu-agent: the page is on http://{url_host(args.host)}:{args.port}/ (it answers to "
        f"host names {', '.join(sorted(hosts))})",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(
            create_app(orch, simulation=Path(args.simulation), allowed=extra),
            host=args.host,
            port=args.port,
            log_level="warning",
        )
    finally:
        orch.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from graph.worker import Worker

    with open_orchestrator(
        args, create=True, pool_size=args.concurrency + 2, kind="worker"
    ) as orch:
        worker = Worker(
            orch,
            concurrency=args.concurrency,
            max_waiting=args.max_waiting,
            lease_seconds=args.lease_seconds,
            poll_seconds=args.poll_seconds,
            exit_when_idle=args.exit_when_idle,
        )
        stop = lambda *_: worker.stopping.set()  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(
            f"gpu-agent: worker {worker.worker_id} serving {args.concurrency} at a time",
            file=sys.stderr,
            flush=True,
        )
        finished = worker.serve()
        emit(
            args,
            {"worker": worker.worker_id, "finished": dict(finished)},
            f"worker {worker.worker_id} finished {sum(finished.values())} job(s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(finished.items())),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Threads still running graph steps were handed back: leave now, before they write.
        os._exit(0)


def cmd_studio(args: argparse.Namespace) -> int:
    """Replace this process with `langgraph dev` (langgraph-cli[inmem], the dev extra), on a
    port known before it starts, so that the Studio link printed is the one it serves."""
    langgraph = Path(sys.executable).with_name("langgraph")
    if not langgraph.exists():
        raise InvalidInput(
            "langgraph dev is not installed: pip install 'langgraph-cli[inmem]' "
            "(the dev extra has it)"
        )
    if not 0 < args.port < 65536:
        raise InvalidInput(f"--port must be 1-65535, not {args.port}")
    if args.jobs < 1:
        raise InvalidInput("--jobs must be at least 1")
    config = Path(args.config) if args.config else Path("langgraph.json")
    if not args.config and not config.exists():
        config = Path(__file__).resolve().parents[1] / "langgraph.json"
    if not config.exists():
        raise InvalidInput(f"no {config}: run from the project directory or pass --config")
    port = _studio_port(args.host, args.port)
    os.environ.setdefault("LANGGRAPH_CLI_NO_ANALYTICS", "1")
    argv = [
        str(langgraph),
        "dev",
        "--no-browser",
        "--host",
        args.host,
        "--port",
        str(port),
        "--config",
        str(config),
        "--n-jobs-per-worker",
        str(args.jobs),
    ]
    print(
        f"gpu-agent: {' '.join(argv[1:])}\nStudio (a hosted page, needs a browser with "
        f"internet): https://smith.langchain.com/studio/?baseUrl=http://{url_host(args.host)}:{port}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(argv[0], argv)


def _bind(host: str, port: int) -> int:
    """Bind `port` on `host` (0: any free one) as a server would, and let it go: the port it
    got. InvalidInput where the host name does not resolve; OSError where it cannot bind."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise InvalidInput(f"--host {host!r}: {exc.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: not a listener's
        s.bind((host, port))
        return int(s.getsockname()[1])


def _studio_port(host: str, port: int) -> int:
    """`port` if it can be bound on `host`, else a free one (said on stderr): `langgraph dev`
    would move to another port by itself, and the printed link would be wrong."""
    try:
        return _bind(host, port)
    except OSError:
        pass
    try:
        got = _bind(host, 0)
    except OSError as exc:
        raise InvalidInput(f"cannot serve on {host}: {exc.strerror}") from None
    print(f"gpu-agent: port {port} is taken on {host}; using {got}", file=sys.stderr)
    return got


def cmd_serve_metrics(args: argparse.Namespace) -> int:
    from graph.hosts import allowed_hosts
    from graph.metrics import MetricsServer, serve_until_signalled

    def ready(server: MetricsServer) -> None:
        emit(
            args,
            {
                "host": server.host,
                "port": server.port,
                "url": server.url,
                "hosts": sorted(server.hosts),
            },
            f"serving metrics on {server.url}",
        )
        sys.stdout.flush()

    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"--port must be 0-65535, not {args.port}")
    allowed = args.allow_host or []
    allowed_hosts([args.host, *allowed])  # a bad name is refused before anything opens
    with open_orchestrator(args, create=False) as orch:
        orch.identity.check_admin("serve the metrics (every project's spend and allocations)")
        try:
            serve_until_signalled(
                orch.services, args.host, args.port, on_ready=ready, allowed=allowed
            )
        except OSError as exc:  # the port is taken, the address is not this machine's
            raise InvalidInput(
                f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}"
            ) from None
    return 0


def url_host(host: str) -> str:
    """A host as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host

"""The `gpu-agent` command.

Exit codes: 0 done (or queued / pending review), 2 invalid input (one line on stderr and,
with --json, {"error": ...} on stdout; nothing changed), 3 denied (council, budget or quota),
4 not placed within --max-wait, 5 not allowed (the caller's token is for another project or
role), 127 a command `run` placed GPUs for could not start.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet import names
from fleet.access import ACCESS, add_identity, identify, identities, revoke_identity
from fleet.budget import describe_moves
from fleet.choose_backend import BackendChoice, gpus_present
from fleet.config import FleetConfig, load_fleet
from fleet.errors import GPUAgentError, InvalidInput, flat
from fleet.jobs import Job, JobQueue
from fleet.models import Event, Status
from fleet.services import Services
from fleet.statedir import default_state_dir, prepare
from fleet.validation import check_against_fleet, check_budget, parse_request
from graph.cli_parser import NOTICE_SIGNALS, Parser, build_parser, error_json
from graph.outcome import RequestOutcome, lease_note
from graph.records import Records

# Only light modules above: the commands that read or write the ledger (status, costs,
# release, history, ...) use Records and never load LangGraph, torch or networkx. What runs
# the graph (the Orchestrator) is imported by the handlers that need it, as is anything heavy.
if TYPE_CHECKING:
    from graph.orchestrator import Orchestrator

EXIT_CODES = {Status.INVALID: 2, Status.DENIED: 3, Status.TIMED_OUT: 4}


def _orchestrator(
    args: argparse.Namespace,
    *,
    create: bool,
    config: FleetConfig | None = None,
    choice: BackendChoice | None = None,
    pool_size: int = 8,
    kind: str = "cli",
) -> Orchestrator:
    """For the commands that run threads: the graph and its checkpointer (LangGraph)."""
    from graph.orchestrator import Orchestrator

    orch = Orchestrator(
        args.state_dir,
        config or _fleet_file(args),
        backend=choice or _backend(args),
        create=create,
        database=_database(args),
        pool_size=pool_size,
        monitor_kind=kind,
    )
    _say_backend(orch.services)
    return orch


def _records(args: argparse.Namespace, *, create: bool) -> Records:
    """For the commands that only read or write the ledger: no graph, no checkpointer."""
    records = Records(
        args.state_dir,
        _fleet_file(args),
        backend=_backend(args),
        create=create,
        database=_database(args),
    )
    _say_backend(records.services)
    return records


def _say_backend(services: Services) -> None:
    if services.note:
        print(f"gpu-agent: {services.note}", file=sys.stderr)
    problem = getattr(services.backend, "problem", None)
    if problem:
        print(
            f"gpu-agent: {services.backend.name}: {problem}; the inventory is empty "
            "(--backend simulated simulates a fleet)",
            file=sys.stderr,
        )


def _database(args: argparse.Namespace) -> str | None:
    return getattr(args, "database", None) or os.environ.get("GPU_AGENT_DATABASE") or None


def _fleet_file(args: argparse.Namespace) -> str | None:
    return args.fleet or os.environ.get("GPU_AGENT_FLEET") or None


def _backend(args: argparse.Namespace) -> BackendChoice:
    name = args.backend or os.environ.get("GPU_AGENT_BACKEND")
    if name is None and (found := gpus_present()):
        print(
            f"gpu-agent: using the simulated fleet (the default), although this host has "
            f"{found} NVIDIA GPU(s): --backend nvml or auto uses them",
            file=sys.stderr,
        )
    allow = args.allow_power_cap or os.environ.get("GPU_AGENT_ALLOW_POWER_CAP") == "1"
    return BackendChoice(
        name or "simulated",
        args.replay or os.environ.get("GPU_AGENT_REPLAY"),
        allow,
        args.ray_address,
    )


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _q(value: object) -> str:
    """A value from the ledger as printed: control characters escaped (one line each)."""
    return flat(str(value))


class _Live:
    """What `request` and `resume` show while they run: the council's votes and the route as
    lines, the recorded events as lines, and on a terminal the monitor's ticks as one line
    that updates in place (off a terminal ticks are left out: the events say what matters)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.ticking = False

    def _line(self, text: str) -> None:
        if self.ticking:
            print("\r\033[K", end="")
            self.ticking = False
        print(text, flush=True)

    def done(self) -> None:
        if self.ticking:
            print()
            self.ticking = False

    def event(self, event: Event) -> None:
        self._line(f"  {event.at:%Y-%m-%d %H:%M:%S}  {event.kind.value:<16} {event.message}")

    def progress(self, line: dict[str, Any]) -> None:
        if line.get("node") != "monitor":
            self._line(f"  {line['text']}")
        elif self.tty:
            print(f"\r\033[K  {line['text']}", end="", flush=True)
            self.ticking = True


def _describe(outcome: RequestOutcome) -> str:
    tid = shlex.quote(outcome.thread_id)
    lines = [f"thread {outcome.thread_id}: {outcome.status.value} ({_q(outcome.reason)})"]
    a = outcome.allocation
    if a is not None:
        lines.append(
            f"allocation {a.id}: {a.count} x {a.gpu_type} on {a.node}, "
            f"${a.price_per_hour:.3f}/GPU-h, "
            f"lease until {a.lease_end:%Y-%m-%d %H:%M:%S} UTC"
        )
        why = lease_note(outcome)
        if why:
            lines.append(why)
        lines.append(f"CUDA_VISIBLE_DEVICES={a.cuda_visible_devices}")
    if outcome.status is Status.RELEASED:
        lines.append(f"charged ${outcome.cost_usd:.2f}")
    if outcome.status is Status.PENDING_REVIEW:
        lines.append(f"decide with: gpu-agent resume {tid} --approve (or --deny)")
    if outcome.status is Status.QUEUED or (outcome.next and outcome.status is Status.ALLOCATED):
        lines.append(
            f"nobody monitors it now: a worker adopts it, or carry on with: gpu-agent resume {tid}"
        )
    return "\n".join(lines)


def _finish(args: argparse.Namespace, outcome: RequestOutcome) -> int:
    _emit(args, outcome.to_json(), _describe(outcome))
    return EXIT_CODES.get(outcome.status, 0)


def _request_of(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "project": args.project or _own_project(args),
        "purpose": args.purpose,
        "count": args.count,
        "duration_hours": args.hours,
        "priority": args.priority,
        "mode": args.mode,
    }
    optional = {
        "gpu_type": args.gpu_type,
        "budget_limit": args.budget,
        "min_memory_gb": args.min_memory_gb,
        "max_wait_minutes": args.max_wait,
        "resumes": args.resumes,
    }
    if args.thread_id is not None:
        names.check("thread id", args.thread_id)
    return raw | {k: v for k, v in optional.items() if v is not None}


def _own_project(args: argparse.Namespace) -> str:
    """Without --project: the project of the caller's token (a member's or approver's)."""
    directory = Path(args.state_dir or default_state_dir())
    who = (
        identify(directory, os.environ.get("GPU_AGENT_TOKEN"))
        if (directory / ACCESS).exists()
        else None
    )
    if who is None or who.project is None:
        raise InvalidInput(
            "--project is required ("
            + (
                "no token names a project of yours"
                if who is None
                else f"{who.name} is an {who.role} of every project"
            )
            + ")"
        )
    return who.project


def cmd_request(args: argparse.Namespace) -> int:
    request = parse_request(_request_of(args))  # invalid input stops here, before anything
    choice = _backend(args)
    config = None
    if choice.name == "simulated":  # real GPUs are known only once the backend opens
        config = load_fleet(_fleet_file(args))
        check_against_fleet(request, config)
    with _orchestrator(args, create=True, config=config, choice=choice) as orch:
        live = None if args.json or args.no_wait else _Live()
        outcome = orch.request(
            request,
            thread_id=args.thread_id,
            wait=not args.no_wait,
            on_event=live.event if live else None,
            on_progress=live.progress if live else None,
        )
        if live is not None:
            live.done()
        return _finish(args, outcome)


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "thread_id": job.thread_id,
        "state": job.state,
        "outcome": job.outcome,
        "worker": job.worker,
        "attempts": job.attempts,
        "error": job.error,
        "project": job.request.project,
    }


def cmd_submit(args: argparse.Namespace) -> int:
    request = parse_request(_request_of(args))
    with _orchestrator(args, create=True) as orch:
        job = orch.submit(request, thread_id=args.thread_id)
        _emit(
            args,
            _job_json(job),
            f"submitted thread {job.thread_id}; a worker runs it (gpu-agent jobs {job.thread_id})",
        )
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _records(args, create=False) as rec:
        jobs = [rec.job(args.thread_id)] if args.thread_id is not None else rec.jobs()
        counts = JobQueue(rec.services.ledger).counts()
    lines = [
        f"{j.thread_id}  {j.state:<8} {j.outcome or '':<15} {_q(j.request.project):<12} "
        f"{_q(j.worker or '')}" + (f"  ({_q(j.error)})" if j.error else "")
        for j in jobs
    ]
    _emit(
        args,
        {"counts": counts, "jobs": [_job_json(j) for j in jobs]},
        "\n".join([*lines, " ".join(f"{k} {v}" for k, v in counts.items())]),
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise InvalidInput(f"--limit must be at least 1, not {args.limit}")
    if args.project is not None:
        names.check("project", args.project)
    with _records(args, create=False) as rec:
        entries = rec.audit(args.project, args.limit)
    lines = [
        f"{datetime.fromtimestamp(e.at, UTC):%Y-%m-%d %H:%M:%S}  {_q(e.action):<8} "
        f"{_q(e.project):<14} {_q(e.target):<16} by {_q(e.who)}: {_q(e.detail)}"
        for e in entries
    ]
    _emit(args, {"entries": [asdict(e) for e in entries]}, "\n".join(lines) or "no entries")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    if args.token_command == "add":
        return _token_add(args)
    directory = prepare(args.state_dir or default_state_dir(), create=False, ledger_here=False)
    if not (directory / ACCESS).exists():
        raise InvalidInput(
            f"{directory / ACCESS} does not exist: no tokens yet (the state "
            "directory is its local user's)"
        )
    identify(directory, os.environ.get("GPU_AGENT_TOKEN")).check_admin(
        f"{args.token_command} identities"
    )
    if args.token_command == "revoke":
        gone = revoke_identity(directory, args.name)
        _emit(
            args,
            {"revoked": gone.name, "role": gone.role, "project": gone.project},
            f"{gone.name} ({gone.role}) revoked: its token no longer works",
        )
        return 0
    everyone = identities(directory)
    _emit(
        args,
        {"identities": [{"name": i.name, "role": i.role, "project": i.project} for i in everyone]},
        "\n".join(
            f"{_q(i.name):<24}{i.role:<10}{_q(i.project or 'every project')}" for i in everyone
        ),
    )
    return 0


def _token_add(args: argparse.Namespace) -> int:
    directory = prepare(args.state_dir or default_state_dir(), create=True)
    if (directory / ACCESS).exists():
        identify(directory, os.environ.get("GPU_AGENT_TOKEN")).check_admin("add identities")
    elif args.role != "admin":
        raise InvalidInput(
            "the first identity must be an admin (who else would set budgets and add the others?)"
        )
    token = add_identity(directory, args.name, args.role, args.project)
    _emit(
        args,
        {"name": args.name, "role": args.role, "project": args.project, "token": token},
        f"{args.name} ({args.role}{' of ' + args.project if args.project else ''}): "
        f"GPU_AGENT_TOKEN={token}\n(shown once; {directory / ACCESS} keeps only its hash)",
    )
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from graph.orchestrator import Orchestrator
    from graph.ui import SERVER, allowed_hosts, create_app, hosts_from_env

    if not 0 < args.port < 65536:
        raise InvalidInput(f"--port must be 1-65535, not {args.port}")
    extra = [args.host, *(args.allow_host or hosts_from_env())]
    hosts = allowed_hosts(extra)  # checked before anything opens
    orch = Orchestrator(
        args.state_dir,
        _fleet_file(args),
        backend=_backend(args),
        database=_database(args),
        identity=SERVER,
        monitor_kind="page",
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"gpu-agent: the page is on http://{shown}:{args.port}/ (it answers to host names "
        f"{', '.join(sorted(hosts))})",
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

    with _orchestrator(args, create=True, pool_size=args.concurrency + 2, kind="worker") as orch:
        worker = Worker(
            orch,
            concurrency=args.concurrency,
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
        _emit(
            args,
            {"worker": worker.worker_id, "finished": dict(finished)},
            f"worker {worker.worker_id} finished {sum(finished.values())} job(s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(finished.items())),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Threads still running graph steps were handed back: leave now, before they write.
        os._exit(0)


def cmd_resume(args: argparse.Namespace) -> int:
    if args.orphans:
        if args.thread_id or args.approve or args.deny or args.no_wait:
            raise InvalidInput("--orphans takes no thread, decision or --no-wait")
        return _adopt(args)
    if args.thread_id is None:
        raise InvalidInput("give the thread to resume (or --orphans)")
    from nodes.review import parse_decision

    names.check("thread id", args.thread_id)
    decision = None
    if args.approve or args.deny:
        decision = parse_decision(
            {"approve": bool(args.approve), "by": args.by, "comment": args.comment}
        )
    with _orchestrator(args, create=False) as orch:
        live = None if args.json or args.no_wait else _Live()
        outcome = orch.resume(
            args.thread_id,
            decision,
            wait=not args.no_wait,
            on_event=live.event if live else None,
            on_progress=live.progress if live else None,
        )
        if live is not None:
            live.done()
        return _finish(args, outcome)


def _adopt(args: argparse.Namespace) -> int:
    """`resume --orphans`: monitor here every allocation nobody monitors, until they end."""
    with _orchestrator(args, create=False) as orch:
        adopted = orch.adopt()
        if not args.json:
            print(
                f"adopted {len(adopted)} allocation(s) nobody monitored"
                + "".join(
                    f"\n  {o.row.id}  {_q(o.row.project)}  thread {o.row.thread_id}"
                    for o, _ in adopted
                ),
                flush=True,
            )
        for _, thread in adopted:
            thread.join()
        ended = [orch.outcome(o.row.thread_id) for o, _ in adopted]
    _emit(
        args,
        {"adopted": [o.to_json() for o in ended]},
        "\n".join(_describe(o) for o in ended) or "nothing to adopt",
    )
    return 0


def cmd_reviews(args: argparse.Namespace) -> int:
    with _orchestrator(args, create=False) as orch:
        waiting = [(orch.outcome(t), e) for t, e in orch.pending_review_entries()]
        now = orch.services.clock.now()  # the audit's clock (a scaled one in tests)
    rows: list[dict[str, Any]] = []
    for out, asked in waiting:
        req = out.request
        rows.append(
            {
                "thread_id": out.thread_id,
                "project": asked.project,
                "requested_by": req.requested_by if req else None,
                "count": req.count if req else None,
                "gpu_type": req.gpu_type if req else None,
                "purpose": req.purpose.value if req else None,
                "hours": req.duration_hours if req else None,
                "asked_at": datetime.fromtimestamp(asked.at, UTC).isoformat(),
                "waiting_s": round(now - asked.at, 1),
                "council": out.council.summary if out.council else None,
            }
        )
    lines = [
        f"{r['thread_id']}  {_q(r['project'])}: {r['count']} x {r['gpu_type'] or 'any'} "
        f"({r['purpose']}) for {r['hours']:g} h, asked by "
        f"{_q(r['requested_by'] or 'unknown')} {_ago(r['waiting_s'])} ago; council: "
        f"{_q(r['council'] or '-')}\n    gpu-agent resume {shlex.quote(r['thread_id'])} "
        "--approve (or --deny) --comment WHY"
        for r in rows
    ]
    _emit(args, {"reviews": rows}, "\n".join(lines) or "no request is waiting for a decision")
    return 0


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_release(args: argparse.Namespace) -> int:
    names.check("allocation id", args.allocation_id)
    with _records(args, create=False) as rec:
        before = rec.services.ledger.get(args.allocation_id)
        release = rec.release(args.allocation_id)  # Forbidden for another project's
        note = " (it was already released)" if before.state == "released" else ""
        _emit(
            args,
            release.model_dump(mode="json") | {"already_released": bool(note)},
            f"{release.allocation_id}: released ({release.reason.value}) after "
            f"{release.hours:.2f} h, charged ${release.cost_usd:.2f}{note}",
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _records(args, create=False) as rec:
        data = rec.status()
    lines = [
        f"backend {data['backend']}"
        + (f": {data['problem']}" if data["problem"] else "")
        + (
            f"; not in the fleet catalog, never placed: {', '.join(data['unpriced_types'])}"
            if data["unpriced_types"]
            else ""
        ),
        f"{'GPU':<14}{'type':<9}{'node':<12}{'holder':<22}{'util':>6}{'mem GB':>9}"
        f"{'temp':>7}{'power':>8}  condition",
    ]
    for g in data["gpus"]:
        holder = f"{_q(g['project'])}/{g['allocation_id']}" if g["allocation_id"] else "-"
        condition = g["condition"] + (f" ({g['unhealthy']})" if g["unhealthy"] else "")
        lines.append(
            f"{g['uuid'][:12]:<14}{g['type']:<9}{g['node'][:11]:<12}{holder:<22}"
            f"{_num(g['util_pct'], '%'):>6}{_num(g['mem_used_gb']):>9}"
            f"{_num(g['temp_c'], 'C'):>7}{_num(g['power_w'], 'W'):>8}  {condition}"
        )
    live = [a for a in data["allocations"] if a["state"] != "released"]
    lines += [f"problem: {_q(p)}" for p in data["problems"]]
    lines.append("")
    lines.append(f"{len(live)} live allocation(s), {len(data['allocations']) - len(live)} released")
    for a in live:
        until = f"until {a['deadline']}" if a["state"] == "active" else "waiting"
        watched = f"monitored by {a['monitor']}" if a["monitored"] else "NOT MONITORED"
        lines.append(
            f"  {a['id']}  {_q(a['project']):<12} {a['state']:<7} {a['count']} x "
            f"{a['gpu_type']:<8} {until}  {watched}"
        )
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fleet.supervise import check_startable
    from graph.run_command import request_and_run, run_on

    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise InvalidInput("no command to run: put it after --")
    if (args.allocation is None) == (args.project is None):
        raise InvalidInput("give either --allocation ID or --project P --count N --hours H")
    if args.grace < 0 or args.notice < 0 or args.requeue < 0:
        raise InvalidInput("--grace, --notice and --requeue must not be negative")
    if args.requeue and args.allocation is not None:
        raise InvalidInput(
            "--requeue needs --project: an allocation given with --allocation "
            "is its owner's to ask for again"
        )
    if args.notice_signal.upper().removeprefix("SIG") not in NOTICE_SIGNALS:
        raise InvalidInput(
            f"--notice-signal must be one of {', '.join(NOTICE_SIGNALS)}, not "
            f"{names.shown(args.notice_signal)}"
        )
    notice = {
        "notice_s": args.notice,
        "notice_signal": signal.Signals["SIG" + args.notice_signal.upper().removeprefix("SIG")],
    }
    check_startable(argv, os.environ)  # before anything is opened or placed
    request = None
    if args.project is not None:
        raw: dict[str, Any] = {
            "project": args.project,
            "purpose": args.purpose,
            "count": args.count,
            "duration_hours": args.hours,
        }
        if args.gpu_type:
            raw["gpu_type"] = args.gpu_type
        request = parse_request(raw)

    def say(line: str) -> None:
        print(f"gpu-agent: {line}", file=sys.stderr, flush=True)

    with _orchestrator(args, create=request is not None) as orch:
        if request is None:
            report = run_on(
                orch, args.allocation, argv, grace_s=args.grace, owned=False, say=say, **notice
            )
        else:
            report = request_and_run(
                orch, request, argv, grace_s=args.grace, say=say, requeue=args.requeue, **notice
            )
    if report.on_gpus:
        say(f"processes of the command still on the GPUs: {report.on_gpus}")
    elif report.ended_by != "command":
        checked = (
            "NVML lists none of its processes on the GPUs"
            if report.on_gpus is not None
            else "this backend lists no GPU processes"
        )
        say(f"the command is gone ({'SIGKILL' if report.killed else 'SIGTERM'}); {checked}")
    if args.json:
        print(json.dumps(report.to_json()))
    return report.exit_code


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
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"gpu-agent: {' '.join(argv[1:])}\nStudio (a hosted page, needs a browser with "
        f"internet): https://smith.langchain.com/studio/?baseUrl=http://{shown}:{port}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(argv[0], argv)


def _studio_port(host: str, port: int) -> int:
    """`port` if it can be bound on `host`, else a free one (said on stderr): `langgraph dev`
    would move to another port by itself, and the printed link would be wrong."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise InvalidInput(f"--host {host!r}: {exc.strerror}") from None

    def bound(wanted: int) -> int:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, wanted))
            return int(s.getsockname()[1])

    try:
        return bound(port)
    except OSError:
        pass
    try:
        got = bound(0)
    except OSError as exc:
        raise InvalidInput(f"cannot serve on {host}: {exc.strerror}") from None
    print(f"gpu-agent: port {port} is taken on {host}; using {got}", file=sys.stderr)
    return got


def cmd_health(args: argparse.Namespace) -> int:
    with _records(args, create=False) as rec:
        if args.clear:
            rec.identity.check_admin("put GPUs back into placement")
        if args.clear and not rec.services.ledger.clear_unhealthy(args.clear):
            raise InvalidInput(f"GPU {args.clear} is not marked unhealthy")
        bad = rec.services.check_health()
    lines = [f"{uuid}  {reason}" for uuid, reason in bad.items()] or ["every GPU is healthy"]
    _emit(args, {"unhealthy": bad}, "\n".join(lines))
    return 0


def cmd_nvml(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleet.nvml.reader import NvmlSession
    from fleet.nvml.record import record, write

    out = Path(args.out)
    if not out.parent.is_dir():
        raise InvalidInput(f"cannot write {out}: {out.parent} is not a directory")
    recording = record(
        NvmlSession(timed=True), seconds=args.seconds, period=args.period, phase=args.phase
    )
    write(recording, out)
    print(f"{out}: {recording['device_count']} GPU(s), {len(recording['samples'])} samples")
    return 0


def _num(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.0f}{unit}"


def cmd_history(args: argparse.Namespace) -> int:
    if args.project is not None:
        names.check("project", args.project)
    with _records(args, create=False) as rec:
        records = rec.history(args.project)
    lines = [f"{'allocation':<16}{'project':<14}{'GPUs':<14}{'hours':>7}{'cost':>11}  reason"]
    for r in records:
        lines.append(
            f"{r.allocation_id:<16}{_q(r.project):<14}{f'{r.count} x {r.gpu_type}':<14}"
            f"{r.hours:>7.2f}{f'${r.cost_usd:,.2f}':>11}  {r.reason.value}"
        )
    _emit(args, {"records": [r.model_dump(mode="json") for r in records]}, "\n".join(lines))
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    with _records(args, create=False) as rec:
        costs = rec.costs()
    rows = []
    lines = [f"{'project':<16}{'spent':>12}{'running':>12}{'budget':>12}{'remaining':>12}"]
    for c in costs:
        remaining = None if c.budget_usd is None else c.budget_usd - c.spent_usd - c.committed_usd
        rows.append(
            {
                "project": c.project,
                "spent_usd": c.spent_usd,
                "accrued_usd": c.accrued_usd,
                "committed_usd": c.committed_usd,
                "budget_usd": c.budget_usd,
                "remaining_usd": remaining,
            }
        )
        lines.append(
            f"{_q(c.project):<16}{f'${c.spent_usd:,.2f}':>12}"
            f"{f'${c.accrued_usd:,.2f}':>12}"
            f"{_usd(c.budget_usd):>12}{_usd(remaining):>12}"
        )
    _emit(args, {"projects": rows}, "\n".join(lines))
    return 0


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def cmd_budget(args: argparse.Namespace) -> int:
    check_budget(args.project, args.usd)
    with _records(args, create=True) as rec:
        moved = rec.set_budget(args.project, args.usd)
    note = f"; {describe_moves(moved)}" if moved else "; no running allocation had to move"
    _emit(
        args,
        {
            "project": args.project,
            "budget_usd": args.usd,
            "moved": [
                {
                    "allocation_id": m.id,
                    "earlier": m.earlier,
                    "deadline_before": m.before,
                    "deadline_after": m.after,
                }
                for m in moved
            ],
        },
        f"budget of {args.project}: ${args.usd:,.2f}{note}",
    )
    return 0


def cmd_serve_metrics(args: argparse.Namespace) -> int:
    from graph.metrics import MetricsServer, serve_until_signalled

    def ready(server: MetricsServer) -> None:
        _emit(
            args,
            {"host": server.host, "port": server.port, "url": server.url},
            f"serving metrics on {server.url}",
        )
        sys.stdout.flush()

    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"--port must be 0-65535, not {args.port}")
    with _orchestrator(args, create=False) as orch:
        try:
            serve_until_signalled(orch.services, args.host, args.port, on_ready=ready)
        except OSError as exc:  # the port is taken, the address is not this machine's
            raise InvalidInput(
                f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}"
            ) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from graph.demo import run_demo  # loaded when it runs

    code: int = run_demo(state_dir=args.state_dir, fleet=_fleet_file(args), as_json=args.json)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleet.config import parse_fleet
    from sim.simulate import as_json, fleet_source, parse_policies, simulate, summary

    policies = parse_policies(args.policies)
    if args.jobs is not None and args.jobs < 1:
        raise InvalidInput(f"--jobs must be at least 1, not {args.jobs}")
    name, text = fleet_source(args.fleet)
    sim = simulate(
        args.trace,
        policies,
        parse_fleet(text, source=f"fleet file {name}"),
        name,
        Path(args.out),
        jobs=args.jobs,
        seed=args.seed,
        fleet_text=text,
    )
    if args.json:
        print(json.dumps(as_json(sim)))
    else:
        print(summary(sim))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from sim.analysis import run_analyze  # like demo: only the CLI reaches into sim/

    code: int = run_analyze(
        state_dir=args.state_dir,
        fleet=args.fleet,
        since=args.since,
        until=args.until,
        out=args.out,
        plots=not args.no_plots,
        as_json=args.json,
    )
    return code


def cmd_council(args: argparse.Namespace) -> int:
    from pathlib import Path

    from council.train import TrainSettings, train

    if args.worlds < 3 or args.steps < 1 or args.trace_jobs < 1:
        raise InvalidInput("--worlds must be at least 3, --steps and --trace-jobs at least 1")
    settings = TrainSettings(
        seed=args.seed,
        worlds=args.worlds,
        steps=args.steps,
        trace=Path(args.trace) if args.trace else None,
        trace_jobs=args.trace_jobs,
        ablations=not args.no_ablations,
    )
    log = (lambda _: None) if args.json else print
    metrics = train(settings, load_fleet(_fleet_file(args)), Path(args.out), log)
    t = metrics["test"]
    assert isinstance(t, dict)
    _emit(
        args,
        metrics,
        f"wrote {args.out}/council.pt: test accuracy {t['accuracy']:.4f}, "
        f"ECE {t['ece']:.4f}, {t['monotonicity']['violations']} monotonicity violations "
        f"({metrics['seconds']} s); see {args.out}/MODEL_CARD.md",
    )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "request": cmd_request,
    "status": cmd_status,
    "release": cmd_release,
    "resume": cmd_resume,
    "history": cmd_history,
    "costs": cmd_costs,
    "budget": cmd_budget,
    "demo": cmd_demo,
    "simulate": cmd_simulate,
    "analyze": cmd_analyze,
    "council": cmd_council,
    "serve-metrics": cmd_serve_metrics,
    "run": cmd_run,
    "health": cmd_health,
    "nvml": cmd_nvml,
    "studio": cmd_studio,
    "submit": cmd_submit,
    "worker": cmd_worker,
    "jobs": cmd_jobs,
    "audit": cmd_audit,
    "token": cmd_token,
    "ui": cmd_ui,
    "reviews": cmd_reviews,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    Parser.json_errors = "--json" in argv
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except GPUAgentError as exc:
        error_json(str(exc), exc.exit_code, type(exc).__name__, Parser.json_errors)
        print(f"gpu-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except sqlite3.DatabaseError as exc:
        message = (
            f"the state directory is damaged ({exc}); move it aside and start afresh, "
            "or restore it from a backup"
        )
        error_json(message, 2, "StateDirError", Parser.json_errors)
        print(f"gpu-agent: {flat(message)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "gpu-agent: interrupted; the thread is checkpointed: `gpu-agent resume` carries it on",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

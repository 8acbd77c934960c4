"""The commands that ask for GPUs and carry threads on: `request`, `submit`, `jobs`,
`resume`, `reviews` and `run`, with how a request's outcome is shown (live while it runs, then
described) and the exit code it gets."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet import names
from fleet.access import ACCESS, identify
from fleet.config import load_fleet
from fleet.errors import InvalidInput
from fleet.fleet_backend import SchedulerJob
from fleet.jobs import Job
from fleet.ledger.runs import MAX_REQUEUES
from fleet.models import MAX_NOTICE_S, NOTICE_SIGNALS, Event, Status, utc
from fleet.statedir import default_state_dir
from fleet.validation import check_against_fleet, parse_request
from graph.cli_common import (
    backend_choice,
    emit,
    fleet_file,
    open_orchestrator,
    open_records,
    quoted,
)
from graph.outcome import RequestOutcome, lease_note

if TYPE_CHECKING:
    from graph.orchestrator import Orchestrator
    from graph.run_command import RunReport

EXIT_CODES = {Status.INVALID: 2, Status.DENIED: 3, Status.TIMED_OUT: 4}


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


def _describe(
    outcome: RequestOutcome, job: SchedulerJob | None = None, budget_end: datetime | None = None
) -> str:
    tid = shlex.quote(outcome.thread_id)
    lines = [f"thread {outcome.thread_id}: {outcome.status.value} ({quoted(outcome.reason)})"]
    shown = outcome.guardrails()
    if shown is not None:
        lines.append(f"guardrails ({shown[0]}): {shown[1].outlook()}")
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
        if budget_end is not None:
            hours = (budget_end - a.started_at).total_seconds() / 3600.0
            lines.append(
                f"its project's budget runs out at {budget_end:%Y-%m-%d %H:%M:%S} UTC, "
                f"{hours:.2f} h in: its GPUs go then (reason budget) unless the budget is "
                "raised (gpu-agent budget set)"
            )
        if job is None:
            lines.append(f"CUDA_VISIBLE_DEVICES={a.cuda_visible_devices}")
        else:  # Slurm sets CUDA_VISIBLE_DEVICES in the job's steps
            lines.append(
                f"Slurm job {job.job_id} on {job.node} holds GPUs {job.gpus}: run in it with "
                f"srun --jobid={job.job_id} ..."
            )
    if outcome.status is Status.RELEASED:
        lines.append(f"charged ${outcome.cost_usd:.2f}")
    if outcome.status is Status.PENDING_REVIEW:
        bare = " [--without-guardrails]" if shown is not None else ""
        lines.append(f"decide with: gpu-agent resume {tid} --approve{bare} (or --deny)")
    if outcome.status is Status.QUEUED or (outcome.next and outcome.status is Status.ALLOCATED):
        lines.append(
            f"nobody monitors it now: a worker adopts it, or carry on with: gpu-agent resume {tid}"
        )
    return "\n".join(lines)


def _finish(
    args: argparse.Namespace,
    outcome: RequestOutcome,
    job: SchedulerJob | None = None,
    budget_end: datetime | None = None,
) -> int:
    """The outcome printed; `job`: the Slurm job that holds its GPUs, where one does;
    `budget_end`: when the project's budget runs out, where that is before the lease ends."""
    data = outcome.to_json() | ({"job": asdict(job)} if job is not None else {})
    if outcome.allocation is not None and outcome.status is Status.ALLOCATED:
        data["allocation"]["budget_end"] = None if budget_end is None else budget_end.isoformat()
    emit(args, data, _describe(outcome, job, budget_end))
    return EXIT_CODES.get(outcome.status, 0)


def _budget_end(orch: Orchestrator, outcome: RequestOutcome) -> datetime | None:
    """When the project's budget ends a running allocation, where that is before its lease
    ends (Budgets: the deadline it moves, the lease it never lengthens), else None."""
    held = outcome.allocation
    if held is None or outcome.status is not Status.ALLOCATED:
        return None
    row = orch.services.ledger.get(held.id)
    if row.state != "active" or not row.budget_cuts or row.deadline is None:
        return None
    return utc(row.deadline)


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
        "workload": args.workload,
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
    choice = backend_choice(args)
    config = None
    if choice.name == "simulated":  # real GPUs are known only once the backend opens
        config = load_fleet(fleet_file(args))
        check_against_fleet(request, config)
    with open_orchestrator(
        args, create=True, config=config, choice=choice, say_problem=False
    ) as orch:
        return _followed(
            args,
            functools.partial(
                orch.request, request, thread_id=args.thread_id, wait=not args.no_wait
            ),
            orch,
        )


def _followed(
    args: argparse.Namespace, start: Callable[..., RequestOutcome], orch: Orchestrator
) -> int:
    """`start(on_event=, on_progress=)` with its progress shown live on a terminal (not with
    --json or --no-wait), then the outcome printed."""
    live = None if args.json or args.no_wait else _Live()
    outcome = start(
        on_event=live.event if live else None, on_progress=live.progress if live else None
    )
    if live is not None:
        live.done()
    held = outcome.allocation
    job = orch.services.ledger.scheduler_job(held.id) if held is not None else None
    return _finish(args, outcome, job, _budget_end(orch, outcome))


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
    with open_orchestrator(args, create=True) as orch:
        job = orch.submit(request, thread_id=args.thread_id)
        emit(
            args,
            _job_json(job),
            f"submitted thread {job.thread_id}; a worker runs it (gpu-agent jobs {job.thread_id})",
        )
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with open_records(args, create=False) as rec:
        jobs = [rec.job(args.thread_id)] if args.thread_id is not None else rec.jobs()
        counts = rec.job_counts()
    lines = [
        f"{j.thread_id}  {j.state:<8} {j.outcome or '':<15} {quoted(j.request.project):<12} "
        f"{quoted(j.worker or '')}" + (f"  ({quoted(j.error)})" if j.error else "")
        for j in jobs
    ]
    emit(
        args,
        {"counts": counts, "jobs": [_job_json(j) for j in jobs]},
        "\n".join([*lines, " ".join(f"{k} {v}" for k, v in counts.items())]),
    )
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    if args.orphans:
        if args.thread_id or args.approve or args.deny or args.no_wait or args.without_guardrails:
            raise InvalidInput("--orphans takes no thread, decision or --no-wait")
        return _adopt(args)
    if args.thread_id is None:
        raise InvalidInput("give the thread to resume (or --orphans)")
    from nodes.review import parse_decision

    names.check("thread id", args.thread_id)
    decision = None
    if args.without_guardrails and not args.approve:
        raise InvalidInput("--without-guardrails goes with --approve")
    if args.approve or args.deny:
        decision = parse_decision(
            {
                "approve": bool(args.approve),
                "by": args.by,
                "comment": args.comment,
                "guardrails": not args.without_guardrails,
            }
        )
    with open_orchestrator(args, create=False) as orch:
        return _followed(
            args,
            functools.partial(orch.resume, args.thread_id, decision, wait=not args.no_wait),
            orch,
        )


def _adopt(args: argparse.Namespace) -> int:
    """`resume --orphans`: monitor here every allocation nobody monitors, until they end."""
    with open_orchestrator(args, create=False) as orch:
        adopted = orch.adopt()
        if not args.json:
            print(
                f"adopted {len(adopted)} allocation(s) nobody monitored"
                + "".join(
                    f"\n  {o.row.id}  {quoted(o.row.project)}  thread {o.row.thread_id}"
                    for o, _ in adopted
                ),
                flush=True,
            )
        for _, thread in adopted:
            thread.join()
        ended = [orch.outcome(o.row.thread_id) for o, _ in adopted]
    emit(
        args,
        {"adopted": [o.to_json() for o in ended]},
        "\n".join(_describe(o) for o in ended) or "nothing to adopt",
    )
    return 0


def cmd_reviews(args: argparse.Namespace) -> int:
    with open_orchestrator(args, create=False) as orch:
        waiting = [(orch.outcome(t), e) for t, e in orch.pending_review_entries()]
        now = orch.services.clock.now()  # the audit's clock (a scaled one in tests)
    rows: list[dict[str, Any]] = []
    shown = [out.council.guardrails if out.council else None for out, _ in waiting]
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
                "guardrails": None
                if out.council is None or out.council.guardrails is None
                else out.council.guardrails.model_dump(mode="json"),
            }
        )
    lines = [
        f"{r['thread_id']}  {quoted(r['project'])}: {r['count']} x {r['gpu_type'] or 'any'} "
        f"({r['purpose']}) for {r['hours']:g} h, asked by "
        f"{quoted(r['requested_by'] or 'unknown')} {_ago(r['waiting_s'])} ago; council: "
        f"{quoted(r['council'] or '-')}"
        + (f"\n    guardrails if approved: {rails.outlook()}" if rails else "")
        + f"\n    gpu-agent resume {shlex.quote(r['thread_id'])} "
        + ("--approve [--without-guardrails]" if rails else "--approve")
        + " (or --deny) --comment WHY"
        for r, rails in zip(rows, shown, strict=True)
    ]
    emit(args, {"reviews": rows}, "\n".join(lines) or "no request is waiting for a decision")
    return 0


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cmd_run(args: argparse.Namespace) -> int:
    from fleet.supervise import check_startable
    from graph.run_command import request_and_run, run_on, sigterm_as_ctrl_c

    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.resume is not None:
        return _resume_run(args, argv)
    if not argv:
        raise InvalidInput("no command to run: put it after --")
    if (args.allocation is None) == (args.project is None):
        raise InvalidInput("give either --allocation ID or --project P --count N --hours H")
    if not (0 <= args.grace < math.inf and 0 <= args.notice < math.inf):
        raise InvalidInput("--grace and --notice must be finite and not negative")
    if args.notice > MAX_NOTICE_S:
        raise InvalidInput(
            f"--notice must be at most {MAX_NOTICE_S:.0f} seconds, not {args.notice:g}"
        )
    if not 0 <= args.requeue <= MAX_REQUEUES:
        raise InvalidInput(f"--requeue must be from 0 to {MAX_REQUEUES}, not {args.requeue}")
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
        if args.workload is not None:
            raw["workload"] = args.workload
        request = parse_request(raw)

    with sigterm_as_ctrl_c(), open_orchestrator(args, create=request is not None) as orch:
        if request is None:
            report = run_on(orch, args.allocation, argv, grace_s=args.grace, say=_say, **notice)
        else:
            report = request_and_run(
                orch, request, argv, grace_s=args.grace, say=_say, requeue=args.requeue, **notice
            )
    return _ran(args, report)


def _say(line: str) -> None:
    print(f"gpu-agent: {line}", file=sys.stderr, flush=True)


def _resume_run(args: argparse.Namespace, argv: list[str]) -> int:
    """`run --resume ID`: the recorded command, carried on (graph.run_command.resume_run)."""
    from graph.run_command import resume_run, sigterm_as_ctrl_c

    if argv or args.allocation is not None or args.project is not None or args.requeue:
        raise InvalidInput(
            "--resume carries on the recorded command and its options: give no command, "
            "--allocation, --project or --requeue"
        )
    names.check("allocation id", args.resume)
    with sigterm_as_ctrl_c(), open_orchestrator(args, create=False) as orch:
        return _ran(args, resume_run(orch, args.resume, say=_say))


def _ran(args: argparse.Namespace, report: RunReport) -> int:
    """What `run` says of how its command ended; its exit status (1 where it is lost)."""
    if report.on_gpus:
        _say(f"processes of the command still on the GPUs: {report.on_gpus}")
    elif report.ended_by != "command":
        checked = (
            "NVML lists none of its processes on the GPUs"
            if report.on_gpus is not None
            else "this backend lists no GPU processes"
        )
        _say(f"the command is gone ({'SIGKILL' if report.killed else 'SIGTERM'}); {checked}")
    if report.exit_code is None and report.ended_by == "command":
        _say("the command ended while its `gpu-agent run` was dead: its exit status is lost")
    if args.json:
        print(json.dumps(report.to_json()))
    return 1 if report.exit_code is None else report.exit_code

"""The commands that read or change the ledger or the access file: `status`, `history`,
`costs`, `budget`, `release`, `health`, `audit` and `token`. Through Records, never the graph:
none of them loads LangGraph, torch or networkx."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet import names
from fleet.access import (
    ACCESS,
    add_identity,
    check_identity,
    identify,
    identities,
    revoke_identity,
)
from fleet.budget import describe_moves
from fleet.errors import InvalidInput
from fleet.models import utc
from fleet.statedir import default_state_dir, prepare
from fleet.supervise import still_running
from fleet.validation import check_budget
from graph.cli_common import emit, open_records, quoted


def cmd_status(args: argparse.Namespace) -> int:
    with open_records(args, create=False) as rec:
        data = rec.status()
    lines = [
        f"backend {data['backend']}"
        + (f": {data['problem']}" if data["problem"] else "")
        + (
            f"; not in the fleet catalog, never placed: {', '.join(data['unpriced_types'])}"
            if data["unpriced_types"]
            else ""
        )
        + (f"; the monitor enforces {data['monitoring']}" if data["monitoring"] else ""),
        f"{'GPU':<18}{'type':<9}{'node':<12}{'holder':<22}{'util':>6}{'mem GB':>9}"
        f"{'temp':>7}{'power':>8}  condition",
    ]
    for g in data["gpus"]:
        # another project's GPU (a member's view: graph.status.scoped) shows its project alone
        holder = (
            "-"
            if g["project"] is None
            else quoted(g["project"]) + (f"/{g['allocation_id']}" if g["allocation_id"] else "")
        )
        condition = g["condition"] + (f" ({g['unhealthy']})" if g["unhealthy"] else "")
        lines.append(
            f"{g['uuid'][:16]:<18}{g['type']:<9}{g['node'][:11]:<12}{holder:<22}"
            f"{_num(g['util_pct'], '%'):>6}{_num(g['mem_used_gb']):>9}"
            f"{_num(g['temp_c'], 'C'):>7}{_num(g['power_w'], 'W'):>8}  {condition}"
        )
    live = [a for a in data["allocations"] if a["state"] != "released"]
    lines += [f"problem: {quoted(p)}" for p in data["problems"]]
    lines.append("")
    lines.append(f"{len(live)} live allocation(s), {len(data['allocations']) - len(live)} released")
    for a in live:
        until = f"until {a['deadline']}{why_then(a)}" if a["state"] == "active" else "waiting"
        watched = f"monitored by {a['monitor']}" if a["monitored"] else "NOT MONITORED"
        job = a["job"]
        held = f"  Slurm job {job['job_id']} on {job['node']} (GPUs {job['gpus']})" if job else ""
        lines.append(
            f"  {a['id']}  {quoted(a['project']):<12} {a['state']:<7} {a['count']} x "
            f"{a['gpu_type']:<8} {until}  {watched}{held}"
            + (f"\n    enforced: {a['enforced']}" if a["enforced"] else "")
            + (f"\n    command: {a['command']}" if a["command"] else "")
        )
    emit(args, data, "\n".join(lines))
    return 0


def why_then(a: dict[str, Any]) -> str:
    """Why a live allocation ends when `status` says: nothing for a lease that runs whole."""
    if a["term_hours"] is not None:
        return (
            f" (a {a['term_hours']:g} h term, renewed while its GPUs work up to "
            f"{a['lease_asked_end']})"
        )
    reason = a["deadline_reason"]
    return "" if reason in (None, "lease-expired") else f" ({reason})"


def _num(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.0f}{unit}"


def cmd_history(args: argparse.Namespace) -> int:
    if args.project is not None:
        names.check("project", args.project)
    with open_records(args, create=False) as rec:
        records = rec.history(args.project)
    lines = [f"{'allocation':<16}{'project':<14}{'GPUs':<14}{'hours':>7}{'cost':>11}  reason"]
    for r in records:
        lines.append(
            f"{r.allocation_id:<16}{quoted(r.project):<14}{f'{r.count} x {r.gpu_type}':<14}"
            f"{r.hours:>7.2f}{f'${r.cost_usd:,.2f}':>11}  {r.reason.value}"
        )
    emit(args, {"records": [r.model_dump(mode="json") for r in records]}, "\n".join(lines))
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    with open_records(args, create=False) as rec:
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
            f"{quoted(c.project):<16}{f'${c.spent_usd:,.2f}':>12}"
            f"{f'${c.accrued_usd:,.2f}':>12}"
            f"{_budget(c.budget_usd):>12}{_usd(remaining):>12}"
        )
    emit(args, {"projects": rows}, "\n".join(lines))
    return 0


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def _budget(value: float | None) -> str:
    """A budget as it was set: in cents, or to the micro-dollar (as costs are kept) where it
    holds fractions of a cent, so that a budget of $0.001 does not read as none ($0.00)."""
    if value is None or round(value, 2) == value:
        return _usd(value)
    if value < 0.000001:  # less than a micro-dollar: its magnitude
        return f"${value:.3g}"
    return f"${value:,.6f}".rstrip("0")


def cmd_budget(args: argparse.Namespace) -> int:
    check_budget(args.project, args.usd)
    with open_records(args, create=True) as rec:
        moved = rec.set_budget(args.project, args.usd)
    note = f"; {describe_moves(moved)}" if moved else "; no running allocation had to move"
    emit(
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
        f"budget of {args.project}: {_budget(args.usd)}{note}",
    )
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    names.check("allocation id", args.allocation_id)
    with open_records(args, create=False) as rec:
        # Forbidden for another project's
        release, here, gave_up = rec.release_checked(args.allocation_id)
        note = "" if here else " (it was already released)"
        if gave_up:
            print(f"warning: {still_running(release.allocation_id)}", file=sys.stderr)
        emit(
            args,
            release.model_dump(mode="json")
            | {"already_released": not here, "command_may_still_run": gave_up},
            f"{release.allocation_id}: released ({release.reason.value}) after "
            f"{release.hours:.2f} h, charged ${release.cost_usd:.2f}{note}",
        )
    return 0


def cmd_preempt(args: argparse.Namespace) -> int:
    names.check("allocation id", args.allocation_id)
    with open_records(args, create=False) as rec:
        moved = rec.preempt(args.allocation_id, args.why)
    emit(
        args,
        {"allocation_id": moved.id, "deadline_before": moved.before, "yields_at": moved.after},
        f"{moved.id}: yields its GPUs at {utc(moved.after):%Y-%m-%d %H:%M:%S} UTC, after its "
        "checkpoint notice (preempted)",
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    if args.clear is not None and not args.clear.strip():
        raise InvalidInput("--clear needs a GPU's uuid (gpu-agent health lists them)")
    with open_records(args, create=False) as rec:
        if args.clear:
            rec.identity.check_admin("put GPUs back into placement")
        if args.clear and not rec.services.ledger.clear_unhealthy(args.clear):
            raise InvalidInput(f"GPU {args.clear} is not marked unhealthy")
        bad = rec.services.check_health()
    lines = [f"{uuid}  {reason}" for uuid, reason in bad.items()] or ["every GPU is healthy"]
    emit(args, {"unhealthy": bad}, "\n".join(lines))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise InvalidInput(f"--limit must be at least 1, not {args.limit}")
    if args.project is not None:
        names.check("project", args.project)
    with open_records(args, create=False) as rec:
        entries = rec.audit(args.project, args.limit)
    lines = [
        f"{datetime.fromtimestamp(e.at, UTC):%Y-%m-%d %H:%M:%S}  {quoted(e.action):<8} "
        f"{quoted(e.project):<14} {quoted(e.target):<16} by {quoted(e.who)}: {quoted(e.detail)}"
        for e in entries
    ]
    emit(args, {"entries": [asdict(e) for e in entries]}, "\n".join(lines) or "no entries")
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
        emit(
            args,
            {"revoked": gone.name, "role": gone.role, "project": gone.project},
            f"{gone.name} ({gone.role}) revoked: its token no longer works",
        )
        return 0
    everyone = identities(directory)
    emit(
        args,
        {"identities": [{"name": i.name, "role": i.role, "project": i.project} for i in everyone]},
        "\n".join(
            f"{quoted(i.name):<24}{i.role:<10}{quoted(i.project or 'every project')}"
            for i in everyone
        ),
    )
    return 0


def _token_add(args: argparse.Namespace) -> int:
    """`token add`, refused before the state directory is created where it can be: a refused
    add changes nothing, a new directory included."""
    check_identity(args.name, args.role, args.project)
    path = Path(args.state_dir or default_state_dir())
    if args.role != "admin" and not (path / ACCESS).exists():
        raise InvalidInput(
            "the first identity must be an admin (who else would set budgets and add the others?)"
        )
    directory = prepare(path, create=True)
    if (directory / ACCESS).exists():
        identify(directory, os.environ.get("GPU_AGENT_TOKEN")).check_admin("add identities")
    token = add_identity(directory, args.name, args.role, args.project)
    emit(
        args,
        {"name": args.name, "role": args.role, "project": args.project, "token": token},
        f"{args.name} ({args.role}{' of ' + args.project if args.project else ''}): "
        f"GPU_AGENT_TOKEN={token}\n(shown once; {directory / ACCESS} keeps only its hash)",
    )
    return 0

"""The LangGraph server's auth (langgraph.json `auth`): the CLI's tokens and rules (fleet.access).

A request's bearer token (`Authorization: Bearer TOKEN`) becomes the identity the state
directory's access.toml gives it; without an access file every caller is the local admin, as
on the CLI. A thread is stamped with its creator's project (metadata `project`); a member or
approver sees, searches and runs only threads of their project, may run requests only for it,
and only an approver or admin may answer a review (a resume command), whose `by` becomes the
caller's name (without an access file, the `by` sent is kept). Every request a run brings is
stamped with the caller's name (`requested_by`). Admins see everything.

The server trusts no caller with its configuration: the runtime context is bound to the
server's own (its environment: GPU_AGENT_HOME, GPU_AGENT_FLEET, GPU_AGENT_BACKEND,
GPU_AGENT_REPLAY, GPU_AGENT_DATABASE, what `Context()` reads). A run whose `context` or
`config.configurable` names another state directory, fleet file, backend, recording or
database is refused (403), whoever asks; echoing the server's own values is fine. Only admins
write a thread's state or steer a run (a command's `update` or `goto`): either could skip the
council or the review. Caller-chosen thread ids must be valid names (fleet.names).

Refusals are HTTP errors with one line, except for MCP's tool calls: the server's MCP endpoint
runs the tool through an in-process client that turns any refusal into a 500 with a traceback,
so for those the graphs themselves refuse (graph/server.py, graph/admin.py) and the refusal
comes back as the tool's result.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from langgraph_sdk import Auth
from langgraph_sdk.auth.types import RunsCreate, ThreadsCreate

from fleet import names, thread_claims
from fleet.access import LOCAL, Identity, identify, role_of
from fleet.errors import Forbidden, InvalidInput
from fleet.statedir import default_state_dir
from graph.checkpoint import carried_status
from nodes.context import BOUND, bound_context_refusal, chosen_context, own_services
from nodes.review import parse_decision

auth = Auth()

VIA_MCP = "via:mcp"  # a permission: the request came through the server's MCP endpoint
# LangGraph's interrupt ids (a hash of the task's namespace): `Command(resume={id: answer})`
# answers interrupts by id, its values the answers
INTERRUPT_ID = re.compile(r"[0-9a-f]{32}")
# The checkpointer deletes no run's checkpoints: a run rolled back (a cancel, or a new run's
# multitask strategy) would leave its allocation without its thread, still monitored by the
# server, its lease passing unseen
ROLLBACK = (
    "a run is not rolled back here: its thread would lose the GPUs it placed; cancel it "
    "with action 'interrupt' (or run with another multitask_strategy)"
)


@auth.authenticate
async def authenticate(authorization: str | None, path: str) -> Auth.types.MinimalUserDict:
    token = authorization.removeprefix("Bearer ").strip() if authorization else None
    try:
        who = identify(default_state_dir(), token)
    except (Forbidden, InvalidInput) as exc:
        raise Auth.exceptions.HTTPException(status_code=401, detail=str(exc)) from None
    permissions = [f"role:{who.role}", f"project:{who.project or ''}"]
    if path.rstrip("/") == "/mcp":  # its tool calls reach on_run below with this identity
        permissions.append(VIA_MCP)
    return {"identity": who.name, "permissions": permissions}


def _identity(name: str, permissions: Sequence[str]) -> Identity:
    perms = dict(p.split(":", 1) for p in permissions if ":" in p)
    return Identity(name, perms.get("project") or None, role_of(perms.get("role", "member")))


def _who(ctx: Auth.types.AuthContext) -> Identity:
    return _identity(ctx.user.identity, ctx.permissions)


def caller_of(config: Mapping[str, Any]) -> Identity | None:
    """The identity the server authenticated for a run (None outside the server)."""
    configurable = config.get("configurable") or {}
    name = configurable.get("langgraph_auth_user_id")
    if not name:
        return None
    return _identity(str(name), configurable.get("langgraph_auth_permissions") or [])


def _refuse(detail: str, status: int = 403) -> Auth.exceptions.HTTPException:
    return Auth.exceptions.HTTPException(status_code=status, detail=detail)


async def _chosen(holder: object) -> list[str]:
    """The bound fields a run, assistant or cron payload (`holder`: its "context" and its
    "config"'s "configurable") chooses (nodes.context.chosen_context), off the event loop when
    there is anything to compare (resolving a relative path reads the working directory,
    which the dev server flags as blocking)."""
    if not isinstance(holder, Mapping):
        return []
    config = holder.get("config")
    sources = (
        holder.get("context"),
        config.get("configurable") if isinstance(config, Mapping) else None,
    )
    if not any(
        isinstance(s, Mapping) and any(s.get(k) not in (None, "") for k in BOUND) for s in sources
    ):
        return []
    return await asyncio.to_thread(chosen_context, *sources)


def _context_refusal(chosen: list[str]) -> Auth.exceptions.HTTPException:
    return _refuse(bound_context_refusal(chosen))


def _answers(resume: Any, who: Identity) -> Any:
    """A resume command's answer(s) as the review will read them: each a decision, refused
    in one line (422) before the run where it is none (the graph asks again, but the caller
    should hear why now); with tokens, the caller's (`by`), whatever form it came in. (MCP's
    tool calls send no command.)"""
    if (
        isinstance(resume, Mapping)
        and resume
        and all(isinstance(k, str) and INTERRUPT_ID.fullmatch(k) for k in resume)
    ):
        return {k: _answer(v, who) for k, v in resume.items()}
    return _answer(resume, who)


def _answer(answer: Any, who: Identity) -> Any:
    theirs = who.name != LOCAL.name
    try:
        human = parse_decision(
            answer | {"by": who.name} if theirs and isinstance(answer, dict) else answer
        )
    except InvalidInput as exc:
        raise _refuse(str(exc), 422) from None
    if theirs:
        human = human.model_copy(update={"by": who.name})
    return human.model_dump(mode="json")


def _check_thread_id(thread_id: object) -> None:
    if thread_id is not None:
        why = names.problem("thread id", str(thread_id))
        if why is not None:
            raise _refuse(why, 422)


@auth.on.threads.create
async def on_thread_create(
    ctx: Auth.types.AuthContext, value: ThreadsCreate
) -> dict[str, str] | None:
    """A member's thread is stamped with their project; the filter returned makes
    `if_exists="do_nothing"` hand back only a thread of that project (another's: 409)."""
    _check_thread_id(value.get("thread_id"))
    who = _who(ctx)
    if who.admin:
        return None
    metadata = value.setdefault("metadata", {})  # in place: the server keeps the dict
    metadata["project"] = who.project
    return {"project": who.project or ""}


@auth.on.threads.create_run
async def on_run(ctx: Auth.types.AuthContext, value: RunsCreate) -> dict[str, str] | None:
    who = _who(ctx)
    # Over MCP a refusal here becomes a 500: the graphs refuse those runs themselves.
    mcp = VIA_MCP in ctx.permissions
    _check_thread_id(value.get("thread_id"))
    kwargs = value.get("kwargs") or {}
    chosen = await _chosen(kwargs)
    if chosen and not mcp:
        raise _context_refusal(chosen)
    run_input = kwargs.get("input")
    request = run_input.get("request") if isinstance(run_input, dict) else None
    if isinstance(request, dict):
        project = request.get("project", "default")
        why = names.problem("project", project)
        if why is not None and not mcp:
            raise _refuse(why, 422)
        if why is None and not who.may_act_on(project) and not mcp:
            raise _refuse(f"{who.name} may not request GPUs for project {project}")
        request["requested_by"] = who.name  # in place: who asked, whatever was sent
    if value.get("multitask_strategy") == "rollback" and not mcp:  # on_threads says why
        raise _refuse(ROLLBACK)
    command = kwargs.get("command") or {}
    if isinstance(command, dict):
        steered = [k for k in ("update", "goto") if command.get(k) not in (None, {}, [], "")]
        if steered and not who.admin:
            raise _refuse(
                f"{who.name} may not steer a run (command {' and '.join(steered)}): "
                "only an admin writes a thread's state"
            )
    if isinstance(command, dict) and "resume" in command:
        if who.role == "member":
            raise _refuse(
                f"{who.name} is a member, not an approver: only an approver or an "
                "admin decides reviews"
            )
        command["resume"] = _answers(command["resume"], who)
    if run_input is not None and not mcp:
        await _starts_its_thread(value.get("thread_id"), request)
    if who.admin:
        return None
    metadata = value.get("metadata")
    if isinstance(metadata, dict):  # in place: a stateless run's thread is made from it
        metadata["project"] = who.project
    return {"project": who.project or ""}


async def _starts_its_thread(thread_id: object, request: object) -> None:
    """A run that brings an input, whatever its shape, starts its thread's one request:
    refused (409) where the thread carries a request already (its latest checkpoint says
    so: a copied thread's too) or another run's input claimed it first, also one queued
    behind a run in flight (the server's default multitask strategy enqueues), which no
    checkpoint shows yet. The input would land on the other request's state: it would take
    that allocation for its own (placed, then released at once, as the other's was), leave
    a live one without its monitor, or drop a review. The claim is the CLI's
    (fleet.thread_claims), for the request's id, stamped here where it has none, so that
    nothing but this request is ever placed on the thread (fleet.ledger.threads)."""
    if thread_id is None:  # a stateless run: a thread of its own
        return
    status = await carried_status(str(thread_id))
    if status is not None:
        raise _refuse(
            f"thread {thread_id} already carries a request ({status}): make a new thread for "
            "a new request (a thread waiting for a review is answered with a resume command)",
            409,
        )
    asked = request.get("request_id") if isinstance(request, dict) else None
    if isinstance(request, dict) and asked is None:
        asked = request["request_id"] = uuid.uuid4().hex  # in place, as requested_by
    try:
        await asyncio.to_thread(
            thread_claims.claim,
            own_services().ledger,
            str(thread_id),
            str(asked or uuid.uuid4().hex),
            "server",
            lambda: False,
        )
    except InvalidInput as exc:
        raise _refuse(f"{exc} (a thread carries one request: make a new thread)", 409) from None


async def _keeps_its_gpus(thread_id: object, who: Identity) -> None:
    """Refuse to delete a thread (or one of its runs) whose allocation is queued or active,
    whoever asks: it would lose its thread while its GPUs stay held, as a rollback would.
    Another project's thread is not named: the project filter answers for it (404)."""
    if thread_id is None:
        return
    live = await asyncio.to_thread(lambda: own_services().ledger.live_on(str(thread_id)))
    ids = [aid for aid, project in live if who.admin or project == who.project]
    if ids:
        raise _refuse(
            f"thread {thread_id} holds allocation {', '.join(ids)}: release it first "
            f"(gpu-agent release {ids[0]}, or the gpu-release tool), then delete the thread",
            409,
        )


@auth.on.threads
async def on_threads(ctx: Auth.types.AuthContext, value: Any) -> dict[str, str] | None:
    """Reading, searching, updating and deleting threads: one's own project's only. Writing a
    thread's state (an update that is neither a metadata patch nor a run's cancel) could
    skip the council or the review: admins only; nor may a thread change project. Nobody
    deletes a thread that holds GPUs (_keeps_its_gpus)."""
    who = _who(ctx)
    if ctx.action == "update" and isinstance(value, Mapping) and value.get("action") == "rollback":
        raise _refuse(ROLLBACK)
    if ctx.action == "delete" and isinstance(value, Mapping):  # one thread, or a prune's
        ids = value.get("thread_ids")
        for thread_id in [value.get("thread_id"), *(ids if isinstance(ids, list | tuple) else [])]:
            await _keeps_its_gpus(thread_id, who)
    if who.admin:
        return None
    if ctx.action == "update" and isinstance(value, Mapping):
        if "metadata" not in value and "action" not in value:
            raise _refuse(f"{who.name} may not write a thread's state: only an admin may")
        metadata = value.get("metadata")
        if isinstance(metadata, Mapping) and metadata.get("project", who.project) != who.project:
            raise _refuse(f"{who.name} may not move a thread to project {metadata.get('project')}")
    return {"project": who.project or ""}


@auth.on.assistants
async def on_assistants(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Everyone may find and read the graphs; only admins change them, and an assistant's
    context is bound like a run's."""
    if ctx.action in ("create", "update"):
        chosen = await _chosen(value)
        if chosen:
            raise _context_refusal(chosen)
    return _who(ctx).admin or ctx.action in ("read", "search")


@auth.on
async def admins_only(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Crons and the store: admins only; a cron's run is bound like any other's."""
    chosen = await _chosen(value.get("payload") if isinstance(value, Mapping) else None)
    if chosen:
        raise _context_refusal(chosen)
    return _who(ctx).admin

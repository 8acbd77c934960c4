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

Every live allocation has a monitor: a run may stop (interrupt_before/_after) only before
anything is placed or queued (STOPS), whoever asks, and runs under the graph's own recursion
limit. What the server or the graph would fail or refuse after this handler is refused before
it claims the thread (422, 404): an input that is no JSON object, a resume command on a thread
not waiting for a review, a thread that does not exist or is another project's, a tool graph
run on a thread.

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
from typing import Any, cast

import httpx
from langgraph_sdk import Auth, get_client
from langgraph_sdk.auth.types import RunsCreate, ThreadsCreate

from fleet import names, thread_claims
from fleet.access import LOCAL, Identity, identify, role_of
from fleet.errors import Forbidden, InvalidInput
from fleet.models import HumanDecision, Status
from fleet.statedir import default_state_dir
from graph.builder import GRAPH_NAME, RECURSION_LIMIT
from graph.checkpoint import carried_status, carried_values
from nodes import audit
from nodes.context import BOUND, bound_context_refusal, chosen_context, own_services
from nodes.review import parse_decision
from nodes.state import State, request_of

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
# The nodes (nodes.wiring) a run may stop before or after (interrupt_before/_after): those that
# run before anything is placed or queued, so that every live allocation keeps its monitor.
# Not allocate: it runs again after each wait, and a run stopped there leaves its request
# queued in its type's line, where nothing will place it.
STOPS = ("validate", "council", "review", "route")


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
    if _by_interrupt(resume):
        return {k: _answer(v, who) for k, v in resume.items()}
    return _answer(resume, who)


def _by_interrupt(resume: Any) -> bool:
    """Whether a resume command maps interrupt ids to answers (else it is one answer)."""
    return (
        isinstance(resume, Mapping)
        and bool(resume)
        and all(isinstance(k, str) and INTERRUPT_ID.fullmatch(k) for k in resume)
    )


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
    thread_id = value.get("thread_id")
    _check_thread_id(thread_id)
    kwargs = value.get("kwargs") or {}
    _keeps_its_monitor(kwargs)
    chosen = await _chosen(kwargs)
    if chosen and not mcp:
        raise _context_refusal(chosen)
    run_input = kwargs.get("input")
    if run_input is not None and not isinstance(run_input, dict):
        raise _refuse("the input must be a JSON object: {'request': {...}} for gpu-agent", 422)
    await _its_thread(value, who)
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
        await _waits_for_review(thread_id, kwargs, command["resume"])
    if run_input is not None and not mcp:
        await _starts_its_thread(thread_id, request)
    if who.admin:
        return None
    metadata = value.get("metadata")
    if isinstance(metadata, dict):  # in place: a stateless run's thread is made from it
        metadata["project"] = who.project
    return {"project": who.project or ""}


def _keeps_its_monitor(kwargs: Mapping[str, Any]) -> None:
    """Refuse (422, whoever asks) a run that would stop once it placed GPUs: its allocation
    would live on with nothing monitoring it, past its lease. A run may stop only before or
    after the STOPS nodes. Its recursion limit is the graph's own, whatever was sent (in
    place: Studio may send one), since the monitor loops a super-step per tick and a lower
    limit would stop it."""
    for key in ("interrupt_before", "interrupt_after"):
        nodes = kwargs.get(key)
        if nodes in (None, [], ()):
            continue
        named = nodes if isinstance(nodes, list | tuple) else [nodes]
        late = [str(n) for n in named if n not in STOPS]
        if late:
            raise _refuse(
                f"a run may not stop at {', '.join(late)} ({key}): it may stop only before "
                f"or after {', '.join(STOPS)}, before anything is placed, so that every "
                "allocation keeps its monitor",
                422,
            )
    config = kwargs.get("config")
    if isinstance(config, dict):
        config["recursion_limit"] = RECURSION_LIMIT


async def _its_thread(value: RunsCreate, who: Identity) -> None:
    """A run's thread as the server holds it, looked up before anything is read or claimed
    for it: refused as the server would refuse it after this handler (404), where it does not
    exist and the run would not make it, or is another project's, so that no claim outlives
    the refusal. Only gpu-agent runs on a thread (422): the tools, run there, would take it
    over (its graph_id), hiding a review it waits for."""
    thread_id = value.get("thread_id")
    if thread_id is None:
        return
    thread = await _server_thread(str(thread_id))
    metadata = (thread or {}).get("metadata") or {}
    if thread is None and value.get("if_not_exists") != "create":
        raise _refuse(f"thread {thread_id} not found", 404)
    if thread is not None and not (who.admin or metadata.get("project") == who.project):
        raise _refuse(f"thread {thread_id} not found", 404)
    graph = await _graph_of(str(value.get("assistant_id")), metadata)
    if graph != GRAPH_NAME:
        raise _refuse(
            f"{graph} is a tool: run it without a thread (thread_id None), as MCP does", 422
        )


async def _server_thread(thread_id: str) -> dict[str, Any] | None:
    """The thread (None: no such thread), read through langgraph_sdk's loopback client, the
    server's own API in process, past this handler."""
    async with get_client(url=None, api_key=None) as server:
        try:
            return dict(await server.threads.get(thread_id))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise


async def _graph_of(assistant_id: str, thread: Mapping[str, Any]) -> str | None:
    """The graph an assistant runs: the thread's (its metadata) where it ran it last."""
    if assistant_id == thread.get("assistant_id"):
        return thread.get("graph_id")
    async with get_client(url=None, api_key=None) as server:
        return (await server.assistants.get(assistant_id)).get("graph_id")


async def _waits_for_review(thread_id: object, kwargs: Mapping[str, Any], answer: Any) -> None:
    """Refuse (422) a resume command where the thread's checkpoint it runs from (its latest,
    or the one it names) waits for no review: LangGraph would run the graph from there with
    no input, failing with a traceback, and a thread never run could never start. A
    checkpoint the thread does not hold is the run's to refuse, in one line (KnownOnly).
    Refuse (409) an answer to a review its request already has a decision for, on a copy or
    a fork of the thread, unless it is that decision again (`answer`, as _answers made it: a
    run that died after recording it is carried on)."""
    if thread_id is None:  # a stateless resume: the server refuses it
        return
    config = kwargs.get("config")
    configurable = config.get("configurable") if isinstance(config, Mapping) else None
    named = configurable.get("checkpoint_id") if isinstance(configurable, Mapping) else None
    try:
        values = await carried_values(str(thread_id), str(named) if named else None)
    except InvalidInput:
        return
    if values.get("status") != Status.PENDING_REVIEW:
        raise _refuse(f"thread {thread_id} is not waiting for a review", 422)
    state = cast(State, values)
    key = audit.decision_key(state, request_of(state))  # the request's, on any copy of it
    done = await asyncio.to_thread(own_services().ledger.audit_entry, key)
    if done is not None and not _same_decision(answer, audit.recorded(done)):
        raise _refuse(
            f"this review was already decided: {done.action} by {done.who}; nothing changed",
            409,
        )


def _same_decision(answer: Any, recorded: HumanDecision) -> bool:
    """Whether a resume command's answer(s) (_answers' form) are the recorded decision."""
    answers = list(answer.values()) if _by_interrupt(answer) else [answer]
    return all(
        isinstance(a, Mapping)
        and a.get("approve") == recorded.approve
        and a.get("by") == recorded.by
        for a in answers
    )


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

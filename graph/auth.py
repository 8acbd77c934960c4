"""The LangGraph server's auth (langgraph.json `auth`): the CLI's tokens and rules (fleet.access).

A request's bearer token (`Authorization: Bearer TOKEN`) becomes the identity the state
directory's access.toml gives it; without an access file every caller is the local admin, as
on the CLI. A thread is stamped with its creator's project (metadata `project`); a member or
approver sees, searches and runs only threads of their project, may run requests only for it,
and only an approver or admin may answer a review (a resume command), whose `by` becomes the
caller's name (without an access file, the `by` sent is kept). Admins see everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langgraph_sdk import Auth
from langgraph_sdk.auth.types import RunsCreate, ThreadsCreate

from fleet.access import LOCAL, Identity, identify
from fleet.errors import Forbidden, InvalidInput
from fleet.statedir import default_state_dir

auth = Auth()


@auth.authenticate
async def authenticate(authorization: str | None) -> Auth.types.MinimalUserDict:
    token = authorization.removeprefix("Bearer ").strip() if authorization else None
    try:
        who = identify(default_state_dir(), token)
    except (Forbidden, InvalidInput) as exc:
        raise Auth.exceptions.HTTPException(status_code=401, detail=str(exc)) from None
    return {"identity": who.name,
            "permissions": [f"role:{who.role}", f"project:{who.project or ''}"]}


def _identity(name: str, permissions: Sequence[str]) -> Identity:
    perms = dict(p.split(":", 1) for p in permissions if ":" in p)
    return Identity(name, perms.get("project") or None,
                    perms.get("role", "member"))  # type: ignore[arg-type]


def _who(ctx: Auth.types.AuthContext) -> Identity:
    return _identity(ctx.user.identity, ctx.permissions)


def caller_of(config: Mapping[str, Any]) -> Identity | None:
    """The identity the server authenticated for a run (None outside the server)."""
    configurable = config.get("configurable") or {}
    name = configurable.get("langgraph_auth_user_id")
    if not name:
        return None
    return _identity(str(name), configurable.get("langgraph_auth_permissions") or [])


def _refuse(detail: str) -> Auth.exceptions.HTTPException:
    return Auth.exceptions.HTTPException(status_code=403, detail=detail)


@auth.on.threads.create
async def on_thread_create(ctx: Auth.types.AuthContext,
                           value: ThreadsCreate) -> None:
    who = _who(ctx)
    if not who.admin:  # in place: the server keeps its own reference to the dict
        metadata = value.setdefault("metadata", {})
        metadata["project"] = who.project


@auth.on.threads.create_run
async def on_run(ctx: Auth.types.AuthContext,
                 value: RunsCreate) -> dict[str, str] | None:
    who = _who(ctx)
    kwargs = value.get("kwargs") or {}
    request = (kwargs.get("input") or {}).get("request") if isinstance(
        kwargs.get("input"), dict) else None
    if isinstance(request, dict):
        project = str(request.get("project", "default"))
        if not who.may_act_on(project):
            raise _refuse(f"{who.name} may not request GPUs for project {project}")
    command = kwargs.get("command") or {}
    if isinstance(command, dict) and "resume" in command:
        if who.role == "member":
            raise _refuse(f"{who.name} is a member, not an approver: only an approver or an "
                          "admin decides reviews")
        answer = command["resume"]
        if who.name != LOCAL.name:  # with tokens, the decision is the caller's
            if isinstance(answer, bool):
                answer = {"approve": answer}
            if isinstance(answer, dict):
                command["resume"] = answer | {"by": who.name}
    if who.admin:
        return None
    metadata = value.get("metadata")
    if isinstance(metadata, dict):  # in place: a stateless run's thread is made from it
        metadata["project"] = who.project
    return {"project": who.project or ""}


@auth.on.threads
async def on_threads(ctx: Auth.types.AuthContext, value: Any) -> dict[str, str] | None:
    """Reading, searching, updating and deleting threads: one's own project's only."""
    who = _who(ctx)
    return None if who.admin else {"project": who.project or ""}


@auth.on.assistants
async def on_assistants(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Everyone may find and read the graphs; only admins change them."""
    return _who(ctx).admin or ctx.action in ("read", "search")


@auth.on
async def admins_only(ctx: Auth.types.AuthContext, value: Any) -> bool:
    """Crons and the store: admins only."""
    return _who(ctx).admin

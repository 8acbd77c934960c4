"""LangChain tools for agent frameworks: request_gpus, release_gpus, gpu_status.

The tools own the thread id: an agent asks for GPUs and gets a plain result back, never an
exception or a LangGraph interrupt. A request the council splits comes back as
"pending_human_approval" with the thread a human decides on (`gpu-agent resume THREAD
--approve`); a placed request keeps being monitored in the background (idle release, lease,
budget) until it ends or `release_gpus` ends it. An agent framework retries a tool call that
timed out or failed on its side: with an `idempotency_key`, the retry answers where the first
call's request stands instead of requesting the GPUs a second time.
"""

from __future__ import annotations

import hashlib
import shlex
import threading
import uuid
from dataclasses import replace
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet.errors import GPUAgentError, InvalidInput, MonitoredElsewhere, ThreadStarting
from fleet.models import Status
from fleet.validation import parse_request
from graph.orchestrator import Orchestrator
from graph.outcome import RequestOutcome


class RequestGpusArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    project: str = Field(description="The project that pays, e.g. 'vision'.")
    purpose: str = Field(
        default="training", description="training, inference or research (decides the pool)."
    )
    count: int = Field(default=1, ge=1, description="How many GPUs.")
    hours: float = Field(gt=0, description="How long, in hours on the pool's reference GPU.")
    gpu_type: str | None = Field(
        default=None,
        description="A GPU type, e.g. 'A100'; "
        "omit to let routing choose the cheapest that does the job.",
    )
    budget_usd: float | None = Field(
        default=None, gt=0, description="Refuse if the estimate is over this."
    )
    workload: str | None = Field(
        default=None,
        description="What the job is, e.g. 'resnet50': routing then prices each type at this "
        "job's own speed on it (the fleet file's table, or its earlier runs); omit for the "
        "types' average speeds.",
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="A key of your own for this one request (e.g. a uuid you keep): calling "
        "again with the same key (a retry) returns where the first call's request stands, "
        "and never requests the GPUs twice. Use a new key for a new request.",
    )

    @field_validator("count", "hours", "budget_usd", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        """Numbers, not true/false (which pydantic would read as 1 and 0)."""
        if isinstance(v, bool):
            raise ValueError("must be a number, not true or false")
        return v


class ReleaseGpusArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allocation_id: str = Field(description="The allocation_id request_gpus returned.")


class GpuStatusArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


# what a retry with the same key must ask again for the same thread (the request, as checked)
_SAME = {"project", "purpose", "count", "duration_hours", "gpu_type", "budget_limit", "workload"}
# the steps before a request is placed: a thread that stopped at one is carried on by a retry
_DECIDING = {"validate", "council", "route", "allocate"}


def _request(orch: Orchestrator, monitors: list[threading.Thread], **args: Any) -> dict[str, Any]:
    raw = {
        "project": args["project"],
        "purpose": args["purpose"],
        "count": args["count"],
        "duration_hours": args["hours"],
        "gpu_type": args.get("gpu_type"),
        "budget_limit": args.get("budget_usd"),
        "workload": args.get("workload"),
    }
    given = {k: v for k, v in raw.items() if v is not None}
    key = args.get("idempotency_key")
    out: RequestOutcome | None
    try:
        if key is None:
            thread_id = uuid.uuid4().hex
            out = orch.request(given, thread_id=thread_id, wait=False)
        else:
            thread_id = keyed_thread(str(args["project"]), key)
            out = _once(orch, given, thread_id)
    except GPUAgentError as exc:
        return {"status": "invalid", "reason": str(exc)}
    if out is None:
        return {
            "status": "in_progress",
            "reason": "the first call with this idempotency_key is still deciding",
            "thread_id": thread_id,
            "next_step": "call request_gpus again with the same arguments and key",
        }
    return _answer(orch, monitors, out)


def keyed_thread(project: str, key: str) -> str:
    """The thread a request with an idempotency key runs on: one per project and key."""
    return "tool-" + hashlib.sha256(f"{project}\n{key}".encode()).hexdigest()[:32]


def _once(orch: Orchestrator, given: dict[str, Any], thread_id: str) -> RequestOutcome | None:
    """The request on its key's thread. Where the thread exists (a retry) it is looked up
    before the request is checked again (a check that fails now must not hide GPUs the first
    call placed): where it stands, carried on where its first call stopped before placing
    it (it raised, or its process died). None while another call is still starting it."""
    first = _standing(orch, thread_id)
    if first is None:
        try:
            return orch.request(given, thread_id=thread_id, wait=False)
        except ThreadStarting:  # claimed, nothing checkpointed yet: the first call decides
            return None
        except InvalidInput:
            first = _standing(orch, thread_id)  # the first call checkpointed meanwhile
            if first is None:
                raise
    asked = parse_request(given).model_dump(include=_SAME)
    if first.request is not None and first.request.model_dump(include=_SAME) != asked:
        raise InvalidInput(
            "this idempotency_key was already used for another request; "
            "use a new key for a new request"
        )
    if not _DECIDING.intersection(first.next) or first.status is Status.PENDING_REVIEW:
        return first
    try:  # decided in part, not placed: placement is idempotent, one process monitors it
        return orch.resume(thread_id, wait=False)
    except MonitoredElsewhere:  # the first call is deciding or placing it now
        return None


def _standing(orch: Orchestrator, thread_id: str) -> RequestOutcome | None:
    """Where the thread stands; None where it has no checkpoint (or is not the caller's)."""
    try:
        out = orch.outcome(thread_id)
    except InvalidInput:
        return None
    return _as_ledger_has_it(orch, out)


def _as_ledger_has_it(orch: Orchestrator, out: RequestOutcome) -> RequestOutcome:
    """The outcome, released where the ledger has released the allocation its checkpoint
    holds: a release ends it in the ledger at once, in the checkpoint only when its monitor
    next wakes, and a retry must not hand out GPUs that are free again."""
    a = out.allocation
    if a is None or out.status is not Status.ALLOCATED:
        return out
    row = orch.services.ledger.get(a.id)
    if row.state != "released":
        return out
    release = row.to_release()
    return replace(
        out,
        status=Status.RELEASED,
        reason=release.said,
        release=release,
        cost_usd=release.cost_usd,
    )


def _answer(
    orch: Orchestrator, monitors: list[threading.Thread], out: RequestOutcome
) -> dict[str, Any]:
    """The tool's result for where a request stands; what is placed or queued stays watched."""
    thread_id = out.thread_id
    result: dict[str, Any] = {
        "status": out.status.value,
        "reason": out.reason,
        "thread_id": thread_id,
    }
    if out.status is Status.PENDING_REVIEW:
        result |= {
            "status": "pending_human_approval",
            "next_step": f"a human decides: gpu-agent resume {shlex.quote(thread_id)} "
            "--approve (or --deny)",
        }
    if out.allocation is not None:  # a retry may find it ended: which one, still
        result["allocation_id"] = out.allocation.id
    if out.allocation is not None and out.status is Status.ALLOCATED:
        a = out.allocation
        result |= {
            "gpu_type": a.gpu_type,
            "gpu_ids": a.gpu_ids,
            "cuda_visible_devices": a.cuda_visible_devices,
            "lease_end": a.lease_end.isoformat(),
            "price_per_hour": a.price_per_hour,
        }
        if a.renewed_up_to is not None:  # held a term at a time, renewed while its GPUs work
            result |= {"term_hours": a.term_hours, "renewed_up_to": a.renewed_up_to.isoformat()}
    if out.status in (Status.ALLOCATED, Status.QUEUED):  # keep watching it, as `request` would
        monitors.append(orch.continue_in_background(thread_id))
    return result


def _release(orch: Orchestrator, allocation_id: str) -> dict[str, Any]:
    try:
        release = orch.release(allocation_id)
    except GPUAgentError as exc:
        return {"status": "invalid", "reason": str(exc)}
    return {"status": "released"} | release.model_dump(mode="json")


def _status(orch: Orchestrator) -> dict[str, Any]:
    """Free GPUs per type and the live allocations the caller may see. A GPU is free where
    nobody holds it, whoever asks: a member's status (graph.status.scoped) leaves another
    project's GPU its project, without the allocation."""
    data = orch.status()
    free: dict[str, int] = {}
    for g in data["gpus"]:
        if g["project"] is None and g["placeable"]:
            free[g["type"]] = free.get(g["type"], 0) + 1
    live = [
        {k: a[k] for k in ("id", "project", "state", "gpu_type", "count", "deadline")}
        for a in data["allocations"]
        if a["state"] != "released"
    ]
    return {"free_gpus_by_type": free, "allocations": live}


class _NoArgsTool(StructuredTool):
    """A tool that takes no arguments and refuses any, as the other tools refuse extra keys:
    LangChain skips the args schema of a tool whose schema has no fields (and calls it with
    none), so its extra="forbid" would never be seen."""

    def _to_args_and_kwargs(
        self, tool_input: str | dict[str, Any], tool_call_id: str | None
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        GpuStatusArgs.model_validate(tool_input)  # pydantic's ValidationError, as the others
        return super()._to_args_and_kwargs(tool_input, tool_call_id)


def gpu_tools(orch: Orchestrator) -> list[BaseTool]:
    """The three tools over one Orchestrator. Placed requests are monitored by background
    threads of this process (the list `tools[0].metadata["monitors"]`)."""
    monitors: list[threading.Thread] = []
    request = StructuredTool.from_function(
        func=lambda **kw: _request(orch, monitors, **kw),
        name="request_gpus",
        description="Request GPUs for a project. Returns the allocation (GPU ids, "
        "CUDA_VISIBLE_DEVICES, lease end), or that the request is queued, denied, or "
        "pending human approval (then a human must decide before GPUs are placed).",
        args_schema=RequestGpusArgs,
        metadata={"monitors": monitors},
    )
    release = StructuredTool.from_function(
        func=lambda allocation_id: _release(orch, allocation_id),
        name="release_gpus",
        description="Release an allocation now (or cancel a queued request); returns the "
        "hours held and the cost charged.",
        args_schema=ReleaseGpusArgs,
    )
    status = _NoArgsTool.from_function(
        func=lambda: _status(orch),
        name="gpu_status",
        description="Free GPUs per type and the live allocations.",
        args_schema=GpuStatusArgs,
    )
    return [request, release, status]

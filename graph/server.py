"""What langgraph.json points at for `langgraph dev` and the LangGraph server.

The graph is `graph.builder`'s, checkpointer-free (the server refuses a graph that brings its
own), with the same nodes, so that its checkpoints resume anywhere; only its first step also
answers for the server's caller: a plain JSON context must be the server's own
(`services_for` binds it), and a member or approver requests GPUs only for their project.
graph/auth.py refuses both with a 403 before a run starts; the graph refuses them too, as a
result (status invalid or denied, with the reason), for the paths where the auth handler
cannot (MCP's tool calls, where a refusal would come back as a 500) or does not look. The
checkpointer is the project's own SQLite file in the state directory
(env GPU_AGENT_HOME, default ./.gpu-agent), or with env GPU_AGENT_DATABASE=postgresql://... the
PostgreSQL database the workers share, with the same allow-listed serializer the CLI uses,
so a thread started in Studio or through the SDK can be resumed, inspected or forked from the
CLI (`gpu-agent resume THREAD`) or a notebook, and the other way round. It prunes a thread
to its latest checkpoint as it writes, where the fleet keeps no more (graph.checkpoint).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from langgraph.config import get_config
from langgraph.runtime import Runtime

from fleet import names
from fleet.errors import InvalidInput
from fleet.models import GPURequest, Status
from fleet.statedir import CHECKPOINTS, default_state_dir, prepare
from graph.auth import caller_of
from graph.builder import build_graph
from graph.checkpoint import SERVING, SETUP_LOCK, KnownOnly, PrunedOnPut, serializer
from nodes.context import Context, own_services, services_for
from nodes.state import State
from nodes.validate import validate

__all__ = ["checkpointer", "graph"]


def validate_for_caller(state: State, runtime: Runtime[Context]) -> State:
    """`validate`, after the server's own checks: the bound context and the caller's project
    (a malformed project name is validate's to report)."""
    thread_id = runtime.execution_info.thread_id if runtime.execution_info else None
    refused: State = {"thread_id": thread_id or ""}
    try:
        services_for(runtime)
    except InvalidInput as exc:
        return refused | {"status": Status.INVALID, "reason": str(exc)}
    who = caller_of(get_config())
    request = state.get("request")
    project = (
        request.project
        if isinstance(request, GPURequest)
        else request.get("project", "default")
        if isinstance(request, dict)
        else None
    )
    if who is not None and names.valid("project", project) and not who.may_act_on(str(project)):
        return refused | {
            "status": Status.DENIED,
            "reason": f"{who.name} may not request GPUs for project {project}",
        }
    return validate(state, runtime)


graph = build_graph(replace={"validate": validate_for_caller})


class _SqliteSaver(KnownOnly, AsyncSqliteSaver):
    """The SQLite saver, refusing a checkpoint id it does not hold (graph.checkpoint)."""


class _PrunedSqliteSaver(PrunedOnPut, AsyncSqliteSaver):
    """The SQLite saver, keeping a thread's latest checkpoint (graph.checkpoint)."""


@asynccontextmanager
async def checkpointer() -> AsyncIterator[BaseCheckpointSaver[str]]:
    """The server's checkpointer. Where the fleet keeps only a thread's latest checkpoint
    (`[checkpoints] keep`, read from the server's own fleet), it prunes as it writes."""
    async with _opened() as saver:
        SERVING.append(saver)
        try:
            yield saver
        finally:
            SERVING.remove(saver)


@asynccontextmanager
async def _opened() -> AsyncIterator[BaseCheckpointSaver[str]]:
    keep_latest = own_services().config.checkpoints.keep == "latest"
    database = os.environ.get("GPU_AGENT_DATABASE")
    if database:
        async with _postgres(database, keep_latest) as saver:
            yield saver
        return
    directory = prepare(default_state_dir(), create=True)
    async with aiosqlite.connect(str(directory / CHECKPOINTS), timeout=60.0) as conn:
        kind = _PrunedSqliteSaver if keep_latest else _SqliteSaver
        sqlite_saver = kind(conn, serde=serializer())
        await sqlite_saver.setup()
        yield sqlite_saver


@asynccontextmanager
async def _postgres(url: str, keep_latest: bool) -> AsyncIterator[BaseCheckpointSaver[str]]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg import AsyncConnection
    from psycopg.rows import DictRow, dict_row, tuple_row
    from psycopg_pool import AsyncConnectionPool

    class PostgresSaver(KnownOnly, AsyncPostgresSaver):
        """The PostgreSQL saver, refusing a checkpoint id it does not hold."""

    class PrunedPostgresSaver(PrunedOnPut, AsyncPostgresSaver):
        """The PostgreSQL saver, keeping a thread's latest checkpoint (graph.checkpoint)."""

    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    async with AsyncConnectionPool(
        url, connection_class=AsyncConnection[DictRow], min_size=1, max_size=8, kwargs=kwargs
    ) as pool:
        kind = PrunedPostgresSaver if keep_latest else PostgresSaver
        saver = kind(pool, serde=serializer())
        async with pool.connection() as conn:
            while True:  # polled, not a waiting statement: see graph.checkpoint
                async with conn.cursor(row_factory=tuple_row) as cur:
                    await cur.execute("SELECT pg_try_advisory_lock(%s)", (SETUP_LOCK,))
                    row = await cur.fetchone()
                if row and row[0]:
                    break
                await asyncio.sleep(0.05)
            try:
                await saver.setup()
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
        yield saver

"""What langgraph.json points at for `langgraph dev` and the LangGraph server.

The graph is the checkpointer-free one `graph.builder` exports (the server refuses a graph that
brings its own). The checkpointer is the project's own SQLite file in the state directory
(env GPU_AGENT_HOME, default ./.gpu-agent), or with env GPU_AGENT_DATABASE=postgresql://... the
PostgreSQL database the workers share, with the same allow-listed serializer the CLI uses,
so a thread started in Studio or through the SDK can be resumed, inspected or forked from the
CLI (`gpu-agent resume THREAD`) or a notebook, and the other way round.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from fleet.statedir import CHECKPOINTS, default_state_dir, prepare
from graph.builder import graph
from graph.checkpoint import SETUP_LOCK, serializer

__all__ = ["checkpointer", "graph"]


@asynccontextmanager
async def checkpointer() -> AsyncIterator[BaseCheckpointSaver[str]]:
    database = os.environ.get("GPU_AGENT_DATABASE")
    if database:
        async with _postgres(database) as saver:
            yield saver
        return
    directory = prepare(default_state_dir(), create=True)
    async with aiosqlite.connect(str(directory / CHECKPOINTS), timeout=60.0) as conn:
        sqlite_saver = AsyncSqliteSaver(conn, serde=serializer())
        await sqlite_saver.setup()
        yield sqlite_saver


@asynccontextmanager
async def _postgres(url: str) -> AsyncIterator[BaseCheckpointSaver[str]]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row, tuple_row
    from psycopg_pool import AsyncConnectionPool

    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    async with AsyncConnectionPool(url, min_size=1, max_size=8, kwargs=kwargs) as pool:
        saver = AsyncPostgresSaver(pool, serde=serializer())  # type: ignore[arg-type]
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

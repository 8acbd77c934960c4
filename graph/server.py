"""What langgraph.json points at for `langgraph dev` and the LangGraph server.

The graph is the checkpointer-free one `graph.builder` exports (the server refuses a graph that
brings its own). The checkpointer is the project's own SQLite file in the state directory
(env GPU_AGENT_HOME, default ./.gpu-agent), with the same allow-listed serializer the CLI uses,
so a thread started in Studio or through the SDK can be resumed, inspected or forked from the
CLI (`gpu-agent resume THREAD`) or a notebook, and the other way round.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from fleet.statedir import CHECKPOINTS, default_state_dir, prepare
from graph.builder import graph
from graph.checkpoint import serializer

__all__ = ["checkpointer", "graph"]


@asynccontextmanager
async def checkpointer() -> AsyncIterator[AsyncSqliteSaver]:
    directory = prepare(default_state_dir(), create=True)
    async with aiosqlite.connect(str(directory / CHECKPOINTS), timeout=60.0) as conn:
        saver = AsyncSqliteSaver(conn, serde=serializer())
        await saver.setup()
        yield saver

"""Checkpointers for the graph, with our models allow-listed: SQLite in the state directory, or
the PostgreSQL database the ledger is in (so any worker can resume any thread)."""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
)
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from pydantic import BaseModel

import fleet.models
from fleet.errors import InvalidInput, StateDirError
from fleet.models import Status
from fleet.sql import check_alive, lock_key, redact
from fleet.statedir import CHECKPOINTS


def model_allowlist() -> list[tuple[str, str]]:
    """Every pydantic model and enum in fleet.models: the only custom types in the state."""
    return [
        (obj.__module__, name)
        for name, obj in vars(fleet.models).items()
        if inspect.isclass(obj)
        and obj.__module__ == fleet.models.__name__
        and (issubclass(obj, BaseModel) or issubclass(obj, enum.Enum))
    ]


def serializer() -> JsonPlusSerializer:
    return JsonPlusSerializer(allowed_msgpack_modules=model_allowlist())


class KnownOnly(BaseCheckpointSaver[str]):
    """A saver (mixed in before LangGraph's) that refuses a checkpoint id it does not hold,
    one pruned (`[checkpoints] keep = "latest"`) or never written: LangGraph would take it
    for a new thread and run the graph from its start with what it was given, so that a
    fork from it moved the thread's head to an empty or invalid state (on the LangGraph
    server, one no run could carry on), where now nothing changes."""

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return _held(config, super().get_tuple(config))

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return _held(config, await super().aget_tuple(config))


def _held(config: RunnableConfig, found: CheckpointTuple | None) -> CheckpointTuple | None:
    asked = get_checkpoint_id(config)
    if found is None and asked:
        thread = config["configurable"].get("thread_id")
        raise InvalidInput(
            f"thread {thread!r} has no checkpoint {asked!r} (nothing changed): a thread keeps "
            'only its latest checkpoint unless the fleet sets [checkpoints] keep = "all"'
        )
    return found


class _SqliteSaver(KnownOnly, SqliteSaver):
    """SqliteSaver, refusing a checkpoint id it does not hold."""


def open_sqlite_saver(state_dir: str | Path) -> SqliteSaver:
    path = Path(state_dir) / CHECKPOINTS
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=60.0)
        saver = _SqliteSaver(conn, serde=serializer())
        saver.setup()
    except sqlite3.DatabaseError as exc:
        raise StateDirError(
            f"checkpoints {path} are unreadable ({exc}); move the file aside to start afresh "
            "(running requests then cannot be resumed)"
        ) from None
    return saver


# PostgresSaver.setup() runs its migrations without a lock: workers starting together would
# race. Whoever holds SETUP_LOCK runs them; the others poll for it rather than wait in a
# statement, because a migration's CREATE INDEX CONCURRENTLY waits for every open statement.
SETUP_LOCK = lock_key("gpu-agent:checkpoint-setup")


def open_postgres_saver(url: str, *, pool_size: int = 8) -> BaseCheckpointSaver[str]:
    """A PostgresSaver over a connection pool, set up (once, whoever starts first)."""
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg import Connection, Error
    from psycopg.rows import DictRow, dict_row, tuple_row
    from psycopg_pool import ConnectionPool, PoolTimeout

    class KnownPostgresSaver(KnownOnly, PostgresSaver):
        """PostgresSaver, refusing a checkpoint id it does not hold."""

    pool = ConnectionPool(
        url,
        connection_class=Connection[DictRow],
        min_size=1,
        max_size=max(2, pool_size),
        open=False,
        timeout=60.0,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        # a connection the server dropped while it waited in the pool (a restart, an idle
        # timeout) is replaced when taken, not handed to a run, which it would fail; read
        # without a round trip (psycopg_pool's check_connection sends one each time)
        check=check_alive,
    )
    try:
        pool.open(wait=True, timeout=15.0)
        saver = KnownPostgresSaver(pool, serde=serializer())
        with pool.connection() as conn:
            while True:
                with conn.cursor(row_factory=tuple_row) as cur:
                    row = cur.execute("SELECT pg_try_advisory_lock(%s)", (SETUP_LOCK,)).fetchone()
                if row and row[0]:
                    break
                time.sleep(0.05)
            try:
                saver.setup()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
    except (Error, PoolTimeout) as exc:
        pool.close()
        raise StateDirError(
            f"cannot open checkpoints in {redact(url)}: {str(exc).strip().splitlines()[0]}"
        ) from None
    return saver


def open_checkpointer(
    state_dir: str | Path, database: str | None = None, *, pool_size: int = 8
) -> BaseCheckpointSaver[str]:
    """Where threads are checkpointed: `database` (PostgreSQL) if given, else the state dir.
    Close it with `saver.conn.close()` (a connection or a pool)."""
    if database is not None:
        return open_postgres_saver(database, pool_size=pool_size)
    return open_sqlite_saver(state_dir)


def close_checkpointer(saver: BaseCheckpointSaver[str]) -> None:
    """Close a saver's connection (SQLite) or pool (PostgreSQL), under the saver's own lock:
    a graph still running in a background thread (a `run` interrupted while placing) then
    fails its next write with an error, instead of crashing the process (SQLite) with a write
    on a connection closed under it."""
    conn = getattr(saver, "conn", None)
    if conn is not None:
        with getattr(saver, "lock", None) or contextlib.nullcontext():
            conn.close()


# The saver graph/server.py's checkpointer() opened, while it is open, for graph.auth to read
# threads through: langgraph.json loads graph/server.py by its path, as a module of its own.
SERVING: list[BaseCheckpointSaver[str]] = []


async def carried_values(thread_id: str, checkpoint_id: str | None = None) -> dict[str, Any]:
    """The state a thread of the LangGraph server carries (empty: none yet), from its latest
    checkpoint (or `checkpoint_id`, InvalidInput where the thread holds no such one):
    graph.auth refuses a new request on such a thread before its run, since the run's input
    would land on the other's state, and a review's answer where it waits for none or was
    answered (on a copy of the thread)."""
    if not SERVING:
        return {}
    configurable = {"thread_id": thread_id}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    found = await SERVING[-1].aget_tuple({"configurable": configurable})
    return dict(found.checkpoint["channel_values"]) if found else {}


async def carried_status(thread_id: str) -> str | None:
    """The status of the request a thread carries (None: it carries none yet): carried_values."""
    status = (await carried_values(thread_id)).get("status")
    return None if status is None else str(status)


# A monitored thread writes a checkpoint a tick (about 7.6 KB): ten hours at the default
# 60-second tick wrote 303, 2.3 MB, and nothing read them after the next. Orchestrator
# prunes a thread to its latest checkpoint at a run's first tick, every PRUNE_EVERY ticks
# after, and when a run that ticked or released stops (Orchestrator._stream); the LangGraph
# server's checkpointer at every PRUNE_EVERY-th step of a thread and at its release
# (PrunedOnPut).
PRUNE_EVERY = 32

# the thread's latest checkpoint of each namespace: what a prune keeps
_LATEST = (
    "SELECT checkpoint_ns, MAX(checkpoint_id) FROM checkpoints "
    "WHERE thread_id = ? GROUP BY checkpoint_ns"
)


def _pruning(thread_id: str, latest: Iterable[Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The statements that cut a SQLite thread to `latest` (its _LATEST rows)."""
    where = "WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id < ?"
    statements: list[tuple[str, tuple[str, ...]]] = []
    for ns, kept in latest:
        key = (thread_id, ns, kept)
        statements += [
            (f"DELETE FROM writes {where}", key),
            (f"DELETE FROM checkpoints {where}", key),
            (  # as PostgresSaver.prune leaves it: no parent to go back to
                "UPDATE checkpoints SET parent_checkpoint_id = NULL "
                "WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?",
                key,
            ),
        ]
    return statements


def prune(saver: BaseCheckpointSaver[str], thread_id: str) -> None:
    """Keep only `thread_id`'s latest checkpoint of each namespace, with its pending writes:
    all a resume reads (the state carries every step's outcome; the ledger, the history).
    One transaction, so a crash leaves the thread as it was or pruned. Safe beside a run
    appending to the thread: what it appends is newer than the latest kept."""
    if not isinstance(saver, SqliteSaver):
        saver.prune([thread_id], strategy="keep_latest")  # PostgresSaver's own
        return
    with saver.lock:  # SqliteSaver.cursor would commit what an exception interrupted
        conn = saver.conn
        conn.execute("BEGIN IMMEDIATE")  # the latest read is the latest kept
        try:
            for sql, args in _pruning(thread_id, conn.execute(_LATEST, (thread_id,)).fetchall()):
                conn.execute(sql, args)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()


async def aprune(saver: BaseCheckpointSaver[str], thread_id: str) -> None:
    """`prune` for the asynchronous savers the LangGraph server runs on."""
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver  # the server's: not at start-up

    if not isinstance(saver, AsyncSqliteSaver):
        await saver.aprune([thread_id], strategy="keep_latest")  # AsyncPostgresSaver's own
        return
    async with saver.lock:
        conn = saver.conn
        await conn.execute("BEGIN IMMEDIATE")
        try:
            async with conn.execute(_LATEST, (thread_id,)) as cursor:
                latest = await cursor.fetchall()
            for sql, args in _pruning(thread_id, latest):
                await conn.execute(sql, args)
        except BaseException:
            await conn.rollback()
            raise
        await conn.commit()


class PrunedOnPut(KnownOnly):
    """An asynchronous saver (mixed in before AsyncSqliteSaver or AsyncPostgresSaver) that
    keeps a thread's latest checkpoint, for the LangGraph server, whose runs write one a
    step and which no Orchestrator prunes: after every PRUNE_EVERY-th step of a thread, and
    after the step that released its GPUs. So a thread holds at most PRUNE_EVERY + 1
    checkpoints while it runs, fewer after it ended otherwise (denied, timed out), and one
    after its release. A prune that fails is logged; the next one takes what it left."""

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        saved = await super().aput(config, checkpoint, metadata, new_versions)
        step = metadata.get("step", -1)
        released = checkpoint["channel_values"].get("status") == Status.RELEASED
        if step > 0 and (step % PRUNE_EVERY == 0 or released):
            thread_id = str(config["configurable"]["thread_id"])
            try:
                await aprune(self, thread_id)
            except Exception as exc:  # a run is never failed by its tidying
                logging.getLogger(__name__).warning(
                    "could not prune the checkpoints of thread %s: %s", thread_id, exc
                )
        return saved

"""Checkpointers for the graph: SQLite in the state directory, with our models allow-listed."""

from __future__ import annotations

import enum
import inspect
import sqlite3
from pathlib import Path

from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver
from pydantic import BaseModel

import fleet.models
from fleet.errors import StateDirError
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


def open_sqlite_saver(state_dir: str | Path) -> SqliteSaver:
    path = Path(state_dir) / CHECKPOINTS
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=60.0)
        saver = SqliteSaver(conn, serde=serializer())
        saver.setup()
    except sqlite3.DatabaseError as exc:
        raise StateDirError(
            f"checkpoints {path} are unreadable ({exc}); move the file aside to start afresh "
            "(running requests then cannot be resumed)"
        ) from None
    return saver

"""The ledger's database: SQLite (one file, the default) or PostgreSQL (shared by many hosts).

The ledger writes its SQL once, in SQLite's spelling (`?` and `:name` placeholders, REAL
columns). For PostgreSQL the placeholders become psycopg's and REAL becomes DOUBLE PRECISION
(PostgreSQL's REAL is 4 bytes: a timestamp would lose its seconds).

Writers are serialised so that two processes never decide on the same free GPUs or the same
budget at once. SQLite does it for the whole file (`BEGIN IMMEDIATE`). PostgreSQL does it per
key with transaction-scoped advisory locks: a placement locks its GPU type and its project
(taken in one sorted order, so two writers never deadlock), so placements of other types and
projects proceed in parallel; a write without keys (reconcile, migrations) locks everything.
The schema's keys (one hold per GPU, one charge per allocation) stand behind both.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fleet.errors import StateDirError

T = TypeVar("T")
BUSY_S = 60.0  # how long a SQLite connection waits for another's lock


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What the ledger calls on a transaction: sqlite3.Connection has it, _PgConn mimics it."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any: ...


def is_postgres(target: str | Path) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class Database(ABC):
    """One connection, used by one thread at a time (the lock), in SQLite's or PostgreSQL's
    dialect."""

    dialect: str
    name: str  # the file, or the URL without its password
    # appended to a SELECT that claims a queue row: other claimers skip it rather than wait
    skip_locked: str = ""

    def __init__(self) -> None:
        self.lock = threading.RLock()

    @abstractmethod
    def conn(self) -> Conn:
        """The connection, for one statement outside a transaction (hold `lock`)."""

    @abstractmethod
    def write(self, keys: tuple[str, ...] = ()) -> AbstractContextManager[Conn]:
        """A write transaction, serialised with the writers that name a common key."""

    @abstractmethod
    def read(self) -> AbstractContextManager[Conn]:
        """A consistent read that never blocks writers."""

    def plain(self) -> AbstractContextManager[Conn]:
        """A write that takes no ledger lock: it relies on row locks (a queue claim)."""
        return self.write()

    @abstractmethod
    def tables(self, db: Conn) -> set[str]:
        """The tables of the ledger's schema (SQLite: the file; PostgreSQL: current_schema)."""

    @abstractmethod
    def columns(self, db: Conn, table: str) -> set[str]:
        """A table's column names."""

    def schema(self, sql: str) -> str:
        """The CREATE statements in this dialect."""
        return sql

    def data_version(self, db: Conn) -> int | None:
        """A number that changes when another connection commits; None: not tracked."""
        return None

    def version(self) -> int | None:
        """data_version outside a transaction (read before one opens, a commit in between
        shows as a change the next time)."""
        return None

    def rows(self, sql: str, args: tuple[object, ...] | dict[str, object] = ()) -> list[Any]:
        """One read statement outside a transaction (a statement is consistent by itself)."""
        with self.lock:
            return self.conn().execute(sql, args).fetchall()

    def liveness(self, sql: str, args: tuple[object, ...] = ()) -> int:
        """One statement that only says whether a process is alive (a monitor's beat, its
        giving up), atomic; the rows it changed. Where the database lives with the process
        (SQLite) it is not synced to disk: a crash of the process never loses it, and what a
        power failure loses it loses with the process. A server (PostgreSQL) may fail while
        the process lives on: there it commits as any other statement."""
        with self.lock:
            return int(self.conn().execute(sql, args).rowcount)

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        """`durable=False`: a scratch ledger (a simulation's). It lives in memory, where a
        commit costs no write to the file, and is written to its file when closed; the file
        stays locked meanwhile, so no other process reads or writes it half-way."""
        super().__init__()
        self.name = str(path)
        self._alone = not durable  # no other connection writes: reads need no transaction
        self._file: sqlite3.Connection | None = None  # a scratch ledger's file, held
        self._wal = False  # a log that a commit at synchronous NORMAL may skip syncing
        self._relaxed = False  # at NORMAL for a liveness statement: FULL again before any write
        try:
            if durable:
                self._db = _connect(str(path))
                db = self._db
                mode = unlocked(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
                self._wal = str(mode).lower() == "wal"
                self._db.execute("PRAGMA synchronous = FULL")
            else:
                self._file = _connect(str(path))
                self._file.execute("PRAGMA locking_mode = EXCLUSIVE")
                self._file.execute("PRAGMA journal_mode = WAL")
                self._file.execute("PRAGMA synchronous = OFF")
                self._file.execute("BEGIN IMMEDIATE")  # the lock, held until closed
                self._file.execute("COMMIT")
                self._db = _connect(":memory:")
                self._file.backup(self._db)  # a ledger left there goes on
            self._db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise StateDirError(
                f"ledger {path} is unreadable ({exc}); move it aside to start a new one"
            ) from None

    def conn(self) -> Conn:
        if self._relaxed:
            self._sync()
        return self._db

    @contextmanager
    def _begin(self, mode: str) -> Iterator[Conn]:
        with self.lock:
            if self._relaxed:
                self._sync()
            self._db.execute(f"BEGIN {mode}")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def write(self, keys: tuple[str, ...] = ()) -> AbstractContextManager[Conn]:
        return self._begin("IMMEDIATE")  # one writer for the whole file, across processes

    def read(self) -> AbstractContextManager[Conn]:
        return self._locked() if self._alone else self._begin("DEFERRED")

    @contextmanager
    def _locked(self) -> Iterator[Conn]:
        """A read where no other connection can write: one state without a transaction."""
        with self.lock:
            yield self._db

    def tables(self, db: Conn) -> set[str]:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def columns(self, db: Conn, table: str) -> set[str]:
        return {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}

    def data_version(self, db: Conn) -> int | None:
        if self._alone:  # no other connection: nothing it could have committed
            return 0
        return int(db.execute("PRAGMA data_version").fetchone()[0])

    def version(self) -> int | None:
        with self.lock:
            return self.data_version(self._db)

    def liveness(self, sql: str, args: tuple[object, ...] = ()) -> int:
        """In WAL mode at synchronous NORMAL a commit is written to the log, not synced (an
        fsync each, about 0.15 ms here, at every beat and every monitor given up). Inside a
        transaction (where SQLite keeps the level) it commits with it; a scratch ledger is in
        memory. Should an exception (a KeyboardInterrupt) stop it half-way, the connection
        goes back to FULL before it is used again (`_relaxed`)."""
        with self.lock:
            if self._alone or not self._wal or self._db.in_transaction:
                return int(self._db.execute(sql, args).rowcount)
            self._relaxed = True
            try:
                self._db.execute("PRAGMA synchronous = NORMAL")
                return int(self._db.execute(sql, args).rowcount)
            finally:
                self._sync()

    def _sync(self) -> None:
        self._db.execute("PRAGMA synchronous = FULL")
        self._relaxed = False

    def close(self) -> None:
        with self.lock:
            if self._file is not None:
                self._db.backup(self._file)
                self._file.close()
            self._db.close()


def unlocked(run: Callable[[], T], timeout_s: float = BUSY_S) -> T:
    """`run`, tried again a moment later for as long as a busy wait would have waited, while
    SQLite answers "database is locked" at once: a lock it could deadlock on is refused
    without its busy handler (eight processes turning one new ledger to WAL at once: each
    holds the shared lock the others wait to pass)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return run()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _connect(target: str) -> sqlite3.Connection:
    db = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=BUSY_S)
    db.row_factory = sqlite3.Row
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_S * 1000)}")
    return db


class Row(tuple[Any, ...]):
    """A PostgreSQL row read by position or by column name, like sqlite3.Row."""

    _names: dict[str, int]

    def __new__(cls, values: Iterable[Any], names: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: Row(values, names)


_PLACEHOLDER = re.compile(r"\?|(?<!:):([A-Za-z_]\w*)")


@lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """`?` -> %s and `:name` -> %(name)s (and a literal % doubled)."""
    sql = sql.replace("%", "%%")
    return _PLACEHOLDER.sub(lambda m: "%s" if m.group(0) == "?" else f"%({m.group(1)})s", sql)


class _PgConn:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Any = None, /) -> Cursor:
        return self._conn.execute(_pg(sql), parameters or None)  # type: ignore[no-any-return]

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> None:
        rows = list(parameters)
        if rows:
            with self._conn.cursor() as cur:
                cur.executemany(_pg(sql), rows)


def check_alive(conn: Any) -> None:
    """OperationalError where the server no longer holds an idle psycopg connection, read
    without waiting and without a round trip: one it ended (a restart, an administrator, a
    proxy's idle timeout) has sent its notice (the first read) and closed (the second finds
    the end). A statement sent on it would fail, and only a read's failure can be retried
    whatever it met (a write's could not tell whether it ran)."""
    conn.pgconn.consume_input()
    conn.pgconn.consume_input()


def lock_key(key: str) -> int:
    """A stable signed 64-bit advisory-lock key (0 is the everything lock)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big", signed=True) or 1


class PostgresDatabase(Database):
    dialect = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.name = redact(url)
        self._conn: Any = None
        self._connect()

    def _connect(self) -> None:
        try:
            import psycopg
        except ImportError:
            raise StateDirError(
                "a postgresql:// database needs psycopg: pip install 'gpu-agent[postgres]'"
            ) from None
        try:
            self._conn = psycopg.connect(
                self.url, autocommit=True, row_factory=_row_factory, connect_timeout=10
            )
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StateDirError(f"cannot reach the database {self.name}: {reason}") from None

    def conn(self) -> Conn:
        if self._conn.closed or self._conn.broken or not self._alive():
            self._connect()  # the server dropped it (a restart, an administrator): again
        return _PgConn(self._conn)

    def _alive(self) -> bool:
        import psycopg

        try:
            check_alive(self._conn)
        except psycopg.OperationalError:
            return False
        return True

    def backend_pid(self) -> int:
        """The server process of this connection (a notification's sender, fleet.ledger.notify)."""
        return int(self._conn.info.backend_pid)

    @contextmanager
    def _tx(self, first: str | None, keys: tuple[str, ...] | None) -> Iterator[Conn]:
        with self.lock, ExitStack() as stack:
            db = self._begun(stack)
            if first:
                db.execute(first)
            if keys is not None:
                self._advisory(db, keys)
            yield db

    def rows(self, sql: str, args: tuple[object, ...] | dict[str, object] = ()) -> list[Any]:
        """A read on a connection the server drops as it is sent (a restart, an
        administrator ending it a moment before) is read again on a new one: a SELECT
        changed nothing, wherever it stopped."""
        if not sql.lstrip().upper().startswith("SELECT"):
            raise ValueError("rows() reads: one SELECT")
        with self.lock:
            return self._once_more(lambda: self.conn().execute(sql, args).fetchall())

    def _begun(self, stack: ExitStack) -> Conn:
        """A transaction begun on `stack`. A connection the server dropped since its last
        use (a restart, an administrator, a proxy's idle timeout) is only found out at BEGIN,
        before anything of the transaction ran: connected again, it is begun once more."""

        def begin() -> Conn:
            db = self.conn()
            stack.enter_context(self._conn.transaction())
            return db

        return self._once_more(begin)

    def _once_more(self, step: Callable[[], T]) -> T:
        """`step`, and once more on a new connection where the one it met was dropped (the
        caller's to say that nothing of it can have run twice)."""
        import psycopg

        try:
            return step()
        except psycopg.OperationalError:
            if not (self._conn.closed or self._conn.broken):
                raise
            return step()  # conn() connects again

    @staticmethod
    def _advisory(db: Conn, keys: tuple[str, ...]) -> None:
        if not keys:
            db.execute("SELECT pg_advisory_xact_lock(0)")
            return
        db.execute("SELECT pg_advisory_xact_lock_shared(0)")
        for k in sorted(set(keys)):
            db.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(k),))

    def write(self, keys: tuple[str, ...] = ()) -> AbstractContextManager[Conn]:
        return self._tx(None, keys)

    def plain(self) -> AbstractContextManager[Conn]:
        return self._tx(None, None)

    def read(self) -> AbstractContextManager[Conn]:
        return self._tx("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY", None)

    def tables(self, db: Conn) -> set[str]:
        return {
            r[0]
            for r in db.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        }

    def columns(self, db: Conn, table: str) -> set[str]:
        return {
            r[0]
            for r in db.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ?",
                (table,),
            )
        }

    def schema(self, sql: str) -> str:
        return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()


def open_database(target: str | Path, *, durable: bool = True) -> Database:
    """A postgresql:// URL, or a SQLite file's path."""
    if is_postgres(target):
        return PostgresDatabase(str(target))
    return SqliteDatabase(Path(target), durable=durable)

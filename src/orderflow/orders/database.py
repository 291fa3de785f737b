"""The Order Service's database: engine, SQLite tuning, migrations, and a thread pool.

The engine is synchronous (SQLAlchemy's pysqlite and psycopg drivers); every call is
run in a small thread pool of its own so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, Connection, Engine, make_url

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: Key of the PostgreSQL advisory lock that serialises migrations of several processes.
_MIGRATION_LOCK = 0x0F0F_0001
#: Most values in one SQL ``IN`` list.
IN_CHUNK = 500


def normalize_url(url: str) -> URL:
    """A SQLAlchemy URL: ``postgresql://`` and ``postgres://`` use psycopg 3."""
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(
            "database URL is not a valid URL (sqlite:///… or postgresql://…)"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"database URL {redact_db_url(url)} is neither sqlite:// nor postgresql://"
        )
    return parsed


def redact_db_url(url: str | URL) -> str:
    """The URL with its password hidden, for logs and errors."""
    try:
        return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable URL>"


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


#: JSON columns (an order's items) through orjson rather than the json module.
_JSON_CODEC: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


class Database:
    """One engine and its thread pool; ``migrate()`` brings the schema to head."""

    def __init__(self, url: str, *, pool_size: int = 8, echo: bool = False) -> None:
        self.url = normalize_url(url)
        self.dialect = self.url.get_backend_name()
        self._pool_size = pool_size
        self._echo = echo
        self._engine: Engine | None = None
        self._executor: ThreadPoolExecutor | None = None
        # SQLite: the process's writers (group commit, relay, email status) take turns
        # here instead of in SQLite's busy handler, which sleeps 1 to 100 ms between
        # tries. Other processes still meet the busy handler.
        self._write_lock = threading.RLock()
        #: SQLite: the one connection the process's writers share (they take turns on
        #: the lock above anyway), kept open: a pool checkout and return per transaction
        #: cost more than a small transaction's statements.
        self._writer: Connection | None = None

    @property
    def is_sqlite(self) -> bool:
        """True on SQLite (single writer: the relay uses a lease there)."""
        return self.dialect == "sqlite"

    @property
    def engine(self) -> Engine:
        """The engine, created on first use (never at import)."""
        if self._engine is None:
            self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> Engine:
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(
                self.url,
                echo=self._echo,
                pool_size=self._pool_size,
                max_overflow=self._pool_size,
                connect_args={"check_same_thread": False, "timeout": 30},
                **_JSON_CODEC,
            )
            sa.event.listen(engine, "connect", _sqlite_on_connect)
            sa.event.listen(engine, "begin", _sqlite_on_begin)
            return engine
        return sa.create_engine(
            self.url,
            echo=self._echo,
            pool_size=self._pool_size,
            max_overflow=self._pool_size,
            pool_pre_ping=True,
            **_JSON_CODEC,
        )

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (on SQLite: ``BEGIN IMMEDIATE``, so it never deadlocks
        upgrading a read lock, and one thread of this process at a time, on one shared
        connection); commits on success, rolls back on error."""
        if not self.is_sqlite:
            with self.engine.connect() as conn, conn.begin():
                yield conn
            return
        with self._write_lock:
            if self._writer is not None and self._writer.in_transaction():
                raise RuntimeError("a write transaction inside another one of this thread")
            if self._writer is None:
                self._writer = self.engine.connect()
                self._writer.execution_options(sqlite_begin="IMMEDIATE")
            conn = self._writer
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                # The next transaction starts on a fresh connection, whatever this
                # failure did to this one.
                self._writer = None
                conn.close()
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (rolled back at the end)."""
        with self.engine.connect() as conn:
            yield conn

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run blocking database work in this database's thread pool."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._pool_size, thread_name_prefix="orderflow-db"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def run_quick(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a short transaction of the hot path (a few statements): on SQLite on the
        calling thread, elsewhere in the thread pool as :meth:`run` does.

        SQLite is a local file in WAL mode with ``synchronous=NORMAL``: such a commit
        takes well under a millisecond, less than the hop to a pool thread and back,
        and under CPU contention far less (each hop waits for the scheduler and the
        GIL: milliseconds). The cost is that the event loop waits while it runs, and
        while another process holds SQLite's write lock (not the case in
        ``orderflow up``, where the API is the only writer).
        """
        if self.is_sqlite:
            return fn(*args, **kwargs)
        return await self.run(fn, *args, **kwargs)

    def migrate(self) -> None:
        """Apply the Alembic migrations up to head; safe with several processes at once."""
        quiet_alembic()
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.set_main_option("path_separator", "os")
        with self.engine.connect() as conn:
            if self.is_sqlite:
                # The write lock first: a second process waits, then finds head applied.
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                if not self.is_sqlite:
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK}
                    )
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
        log.info("database %s is at the latest schema", redact_db_url(self.url))

    def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        """Close the connections and stop the thread pool."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def in_chunks(values: Sequence[T]) -> list[Sequence[T]]:
    """``values`` in slices of at most ``IN_CHUNK``, one SQL ``IN`` list each."""
    return [values[i : i + IN_CHUNK] for i in range(0, len(values), IN_CHUNK)]


def quiet_alembic() -> None:
    """Alembic logs each plugin and step at INFO; keep only its warnings, unless the
    user configured its logger."""
    logger = logging.getLogger("alembic")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred
    # and skips DDL); WAL lets readers run beside the writer; NORMAL sync is durable
    # across process crashes in WAL mode, and busy_timeout waits for the writer lock.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")

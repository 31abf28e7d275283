"""The store: SQLAlchemy 2 Core tables, one schema for SQLite and PostgreSQL.

Core rather than the ORM: dispatch moves rows in batches of hundreds, and the due query,
the claim and the report are single statements. Alembic owns the schema (`migrate`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python, naive UTC in the database, on both backends."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store: pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)

    def bind_processor(self, dialect: Any) -> Any:
        """Memoise the last value: a dispatch batch binds the same `now` to thousands of rows,
        and converting it (then formatting it, on SQLite) each time showed in the profile."""
        convert = super().bind_processor(dialect)
        last: list[tuple[Any, Any]] = [(None, None)]  # one tuple, swapped whole: thread-safe

        def process(value: Any) -> Any:
            if value is None:
                return None
            seen, converted = last[0]
            if value is not seen:
                converted = convert(value)
                last[0] = (value, converted)
            return converted

        return process


prospects = Table(
    "prospects",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("email", String(320), unique=True),
    Column("first_name", String(200)),
    Column("last_name", String(200)),
    Column("company", String(300)),
    Column("account_key", String(300), index=True),  # the company's domain, else its normalised name
    Column("title", String(300)),
    Column("phone", String(32), index=True),  # E.164; phone-only dedupe and suppression checks
    Column("linkedin_url", String(500), unique=True),
    Column("timezone", String(64)),
    Column("country", String(2)),
    Column("language", String(8)),
    Column("attributes", JSON, nullable=False, default=dict),
    Column("source", String(300)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("erased_at", UTCDateTime),
)

enrollments = Table(
    "enrollments",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # Looked up through the unique (prospect_id, sequence) below: no index of its own.
    Column("prospect_id", ForeignKey("prospects.id", ondelete="CASCADE"), nullable=False),
    Column("sequence", String(100), nullable=False),
    Column("exclusive", Integer, nullable=False, default=1),
    # active: has a next step; paused: waits for a person; completed/exited: done for good
    Column("state", String(16), nullable=False),
    Column("next_step_id", String(100)),
    Column("next_due_at", UTCDateTime),
    Column("sender", String(320)),  # sticky: every touch of this enrollment goes from here
    Column("reason", Text),  # why it paused or exited
    Column("attempts", Integer, nullable=False, default=0),  # transient failures of the next step
    Column("lease_owner", String(100)),
    Column("lease_expires_at", UTCDateTime),
    Column("enrolled_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("prospect_id", "sequence"),
    # The due query reads only active rows, in due order: its cost is O(due), not O(enrollments).
    Index(
        "ix_enrollments_due",
        "next_due_at",
        sqlite_where=text("state = 'active'"),
        postgresql_where=text("state = 'active'"),
    ),
)

touches = Table(
    "touches",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("enrollment_id", ForeignKey("enrollments.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("prospect_id", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
    Column("sequence", String(100), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("action", String(16), nullable=False),
    Column("idempotency_key", String(200), nullable=False, unique=True),
    # sending -> sent | failed | unknown (crash mid-send: reconcile, never resend); skipped; task
    Column("status", String(16), nullable=False),
    Column("spec_version", String(32), nullable=False),
    Column("variant", String(50)),
    Column("sender", String(320)),
    Column("recipient", String(500)),
    Column("subject", Text),
    Column("content_hash", String(64)),
    Column("message_id", String(500), index=True),  # RFC 5322 Message-ID of an email
    Column("provider_message_id", String(500), index=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("lease_owner", String(100)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    Index("ix_touches_sender_created", "sender", "created_at"),
)

events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("channel", String(16)),
    Column("detail", String(200)),  # e.g. hard/soft for a bounce
    Column("prospect_id", BigInteger().with_variant(Integer(), "sqlite"), index=True),
    Column("enrollment_id", BigInteger().with_variant(Integer(), "sqlite"), index=True),
    Column("touch_id", BigInteger().with_variant(Integer(), "sqlite")),
    # Denormalised so reports group without joins.
    Column("sequence", String(100)),
    Column("step_id", String(100)),
    Column("variant", String(50)),
    Column("sender", String(320)),
    Column("payload", JSON, nullable=False, default=dict),
    Column("dedupe_key", String(300), nullable=False, unique=True),
    Index("ix_events_occurred", "occurred_at"),
    # Covering, in the order of the report's GROUP BY: one index-only scan, no sort, serves every report.
    Index(
        "ix_events_report",
        "sequence", "step_id", "variant", "sender", "channel", "kind", "detail", "touch_id", "occurred_at",
        postgresql_include=["id"],
    ),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # email, domain, phone, linkedin
    Column("value", String(500), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("source", String(300)),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("kind", "value"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("touch_id", ForeignKey("touches.id", ondelete="CASCADE"), unique=True),
    Column("enrollment_id", ForeignKey("enrollments.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("prospect_id", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
    Column("owner", String(320)),
    Column("channel", String(16), nullable=False),
    Column("action", String(16), nullable=False),
    Column("title", Text, nullable=False),
    Column("body", Text),
    Column("status", String(16), nullable=False),  # open, done, skipped
    Column("outcome", String(32)),
    Column("note", Text),
    Column("due_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("done_at", UTCDateTime),
    Index("ix_tasks_open", "status", "owner", "due_at"),
)

mailbox_cursors = Table(
    "mailbox_cursors",
    metadata,
    # Where the IMAP reader stopped in each mailbox folder. UIDs only mean something within
    # one UIDVALIDITY (a 32-bit unsigned number, hence BigInteger): when it changes, the
    # folder is read again and the events' dedupe keys absorb what was already seen.
    Column("mailbox", String(320), primary_key=True),
    Column("folder", String(300), primary_key=True),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("last_uid", BigInteger, nullable=False),
    # The last batch started after previous_uid (NULL: it was a first read, by date); if the
    # event log never got the dedupe key of its last event (check_key), that batch is read
    # again, `replayed` counting how often.
    Column("previous_uid", BigInteger),
    Column("check_key", String(300)),
    Column("replayed", Integer, nullable=False, default=0),
    Column("updated_at", UTCDateTime, nullable=False),
)

sender_locks = Table(
    "sender_locks",
    metadata,
    # One row per sender identity (a mailbox, a LinkedIn or phone owner). A dispatch batch
    # holds its senders' rows from the moment it counts their capacity until its touches are
    # committed, so two workers never spend the same capacity (relance.dispatch._Capacity).
    Column("sender", String(320), primary_key=True),
    Column("held_by", String(100)),
    Column("held_at", UTCDateTime),
)

DEFAULT_URL = "sqlite:///relance.db"


def database_url(configured: str | None = None, workspace: Path | None = None) -> str:
    """RELANCE_DATABASE_URL wins over config.yaml; relative SQLite paths are the workspace's."""
    url = os.environ.get("RELANCE_DATABASE_URL") or configured or DEFAULT_URL
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and workspace is not None:
        relative = url.removeprefix("sqlite:///")
        if relative and relative != ":memory:":
            url = f"sqlite:///{(workspace / relative).resolve()}"
    return url


def use_wal(dbapi_conn: Any, timeout: float = 30.0) -> None:
    """Put a SQLite database in WAL mode. Switching a new file's journal takes an exclusive
    lock that SQLite does not wait for (no busy handler): two processes opening the same new
    file at once would see "database is locked", so the switch is retried until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _BinaryList(list):  # type: ignore[type-arg]
    """A list psycopg sends as a binary array: `make_engine` registers its dumper."""


class _BinaryArray(TypeDecorator):
    """An array parameter of ids or keys, bound in binary: psycopg formats a text array in
    Python, element by element, several times slower (a 2,000-row BulkWrite: 22 ms of CPU as
    text, 6 in binary). Only for item types SQLAlchemy binds as they are (integers, strings)."""

    impl = ARRAY
    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        return lambda value: None if value is None else _BinaryList(value)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            use_wal(dbapi_conn)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # A dispatch batch rewrites the same pages in several transactions (touches written
            # `sending`, then `sent` per channel): checkpointing every 40 MB of WAL rather than
            # every 4 MB copies such a page to the database once, not once per transaction.
            cur.execute("PRAGMA wal_autocheckpoint=10000")
            cur.execute("PRAGMA journal_size_limit=67108864")  # then truncate the WAL back to 64 MB
            cur.close()

        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)

    @event.listens_for(engine, "connect")
    def _binary_arrays(dbapi_conn: Any, _record: Any) -> None:
        from psycopg.types.array import ListBinaryDumper

        dbapi_conn.adapters.register_dumper(_BinaryList, ListBinaryDumper)

    return engine


class _WalCheckpointer:
    """Copies a SQLite WAL into the database file on a thread and connection of its own, so
    the dispatch thread does not pay for it at the next auto-checkpoint or at the last close.
    PASSIVE never waits for readers or writers nor blocks them, and sqlite3 releases the GIL
    while it copies and syncs: the work lands on the machine's other core."""

    def __init__(self, path: str):
        self.path = path
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="relance-wal-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()  # requests made while one runs fold into the next

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    return
                try:
                    if conn is None:
                        # mode=rw: a database removed meanwhile is not created again, empty
                        uri = f"file:{urllib.parse.quote(self.path)}?mode=rw"
                        conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass  # only ever early: the next auto-checkpoint or the last close does it
        finally:
            if conn is not None:
                conn.close()


class Store:
    """A database handle: the engine plus the dialect facts the engine needs."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = url
        self.engine = make_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        self._wal_path = database if database and database != ":memory:" and not database.startswith("file:") else None
        self._checkpointer: _WalCheckpointer | None = None
        self._checkpointer_lock = threading.Lock()
        if migrate:
            self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (creates the database on first use).

        Flows open the store on every run, so an up-to-date schema costs one SELECT."""
        from relance.migrate import is_current, upgrade

        if not is_current(self.engine):
            upgrade(self.engine)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def checkpoint_in_background(self) -> None:
        """After a large write on SQLite: start copying the WAL into the database now, beside
        the work that follows (a no-op elsewhere)."""
        if self._wal_path is None:
            return
        with self._checkpointer_lock:
            if self._checkpointer is None:
                self._checkpointer = _WalCheckpointer(self._wal_path)
            self._checkpointer.request()

    def dispose(self) -> None:
        with self._checkpointer_lock:
            if self._checkpointer is not None:
                self._checkpointer.stop()  # before the pool's last connection closes and checkpoints
                self._checkpointer = None
        self.engine.dispose()


def among(conn: Connection, column: Any, values: Sequence[Any]) -> Any:
    """`column IN values` for a batch's long id lists, with the values bound as one parameter
    (a JSON array on SQLite, an array on PostgreSQL): SQLAlchemy expands an IN list into a
    parameter per value on every execution, which showed in the dispatch profile."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=_BinaryArray(column.type)))
    return column.in_(select(literal_column("value")).select_from(func.json_each(bindparam(None, json.dumps(list(values))))))


@dataclass(frozen=True)
class BulkWrite:
    """A hot-path update of many rows, in the fastest form each backend has: driver
    executemany on SQLite (in process, where SQLAlchemy's per-row parameter processing cost
    more than the writes themselves), and on PostgreSQL one statement over one array per
    column (`unnest`): a single round trip and a single plan, not one of each per row.

    `sqlite` has `?` placeholders for one row; `postgres` has one `%s` per column, in the
    same order, each bound as a binary array (`_BinaryList`). Values must already be in the
    driver's types: datetimes through `datetime_param`."""

    sqlite: str
    postgres: str

    def run(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(self.postgres, tuple(_BinaryList(column) for column in zip(*rows)))
        else:
            conn.exec_driver_sql(self.sqlite, list(rows))


@dataclass(frozen=True)
class BulkInsert:
    """Many new rows of one table: driver executemany on SQLite, COPY on PostgreSQL (a
    2,000-touch batch in half the time of one INSERT over unnest arrays: no statement to
    plan, no arrays to build and unpack). Runs in the connection's open transaction.

    Rows are tuples in `columns` order, already in the driver's types (`datetime_param`)."""

    table: str
    columns: tuple[str, ...]

    def run(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        names = ", ".join(self.columns)
        if conn.dialect.name == "postgresql":
            statement = f"COPY {self.table} ({names}) FROM STDIN"
            dbapi_error = conn.dialect.loaded_dbapi.Error
            try:
                with conn.connection.cursor() as cursor, cursor.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)
            except dbapi_error as exc:  # as SQLAlchemy raises for its own statements: IntegrityError...
                raise DBAPIError.instance(statement, None, exc, dbapi_error, dialect=conn.dialect) from exc
        else:
            conn.exec_driver_sql(f"INSERT INTO {self.table} ({names}) VALUES ({', '.join('?' * len(self.columns))})", list(rows))


def datetime_param(dialect: Any) -> Callable[[datetime | None], Any]:
    """An aware datetime as the driver takes it for a UTCDateTime column (for BulkWrite):
    on SQLite the very text SQLAlchemy writes, since SQLite compares datetimes as text.

    Take one per batch: it converts each distinct value once, and a batch's thousands of
    datetimes share a few values."""
    convert = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    seen: dict[datetime | None, Any] = {None: None}

    def param(value: datetime | None) -> Any:
        if value not in seen:
            seen[value] = convert(value)
        return seen[value]

    return param


def utcnow() -> datetime:
    return datetime.now(UTC)

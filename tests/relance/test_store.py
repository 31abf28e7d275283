"""The store: migrations reach the models, on both backends."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from relance.migrate import head_revision, is_current
from relance.store import metadata


def test_migrations_build_exactly_the_models(store):
    with store.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert is_current(store.engine)
    with store.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()


def test_due_query_has_its_partial_index(store):
    indexes = {ix["name"] for ix in inspect(store.engine).get_indexes("enrollments")}
    assert "ix_enrollments_due" in indexes


def test_sqlite_runs_in_wal_mode(tmp_path):
    from relance.store import Store

    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    with s.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    s.dispose()


def test_bulk_writes_store_datetimes_as_sqlalchemy_does(store):
    """The hot path's driver-level writes and SQLAlchemy's own must agree on the stored form:
    SQLite compares datetimes as text, and '09:30:00' sorts before '09:30:00.000000'."""
    from datetime import UTC, datetime

    from sqlalchemy import select, update

    from relance.store import BulkWrite, datetime_param, enrollments, prospects

    on_the_second = datetime(2027, 3, 16, 9, 30, tzinfo=UTC)
    with store.begin() as conn:
        conn.execute(prospects.insert().values(id=1, email="a@example.com", created_at=on_the_second, updated_at=on_the_second))
        for e_id, sequence in ((1, "bulk"), (2, "core")):
            conn.execute(enrollments.insert().values(
                id=e_id, prospect_id=1, sequence=sequence, state="active", enrolled_at=on_the_second, updated_at=on_the_second
            ))  # fmt: skip
        at = datetime_param(conn.dialect)
        BulkWrite(
            sqlite="UPDATE enrollments SET next_due_at = ? WHERE id = ?",
            postgres="UPDATE enrollments SET next_due_at = v.due FROM unnest(%s::timestamp[], %s::bigint[]) AS v(due, id) WHERE enrollments.id = v.id",
        ).run(conn, [(at(on_the_second), 1)])
        conn.execute(update(enrollments).where(enrollments.c.id == 2).values(next_due_at=on_the_second))
    with store.connect() as conn:
        assert conn.scalars(select(enrollments.c.id).where(enrollments.c.next_due_at < on_the_second)).all() == []
        assert conn.scalars(select(enrollments.c.id).where(enrollments.c.next_due_at == on_the_second).order_by(enrollments.c.id)).all() == [1, 2]
        raw = text("SELECT CAST(next_due_at AS TEXT) FROM enrollments ORDER BY id")
        bulk, core = conn.execute(raw).scalars().all()
    assert bulk == core


def test_bulk_inserts_store_rows_as_sqlalchemy_does(store):
    """COPY on PostgreSQL, executemany on SQLite: the same stored values as SQLAlchemy's own
    insert, NULLs and datetimes included."""
    from datetime import UTC, datetime

    from sqlalchemy import insert, select

    from relance.store import BulkInsert, datetime_param, prospects, touches

    now = datetime(2027, 3, 16, 9, 30, tzinfo=UTC)
    row = {
        "enrollment_id": 1, "prospect_id": 1, "sequence": "s", "step_id": "intro", "channel": "email", "action": "send",
        "status": "sending", "spec_version": "v1", "subject": "Un été à Paris\ttab", "error": None, "attempts": 0, "created_at": now,
    }  # fmt: skip
    columns = tuple(row) + ("idempotency_key",)
    with store.begin() as conn:
        conn.execute(prospects.insert().values(id=1, email="a@example.com", created_at=now, updated_at=now))
        conn.execute(text("INSERT INTO enrollments (id, prospect_id, sequence, exclusive, state, attempts, enrolled_at, updated_at)"
                          " SELECT 1, 1, 's', 1, 'active', 0, created_at, created_at FROM prospects"))  # fmt: skip
        at = datetime_param(conn.dialect)
        BulkInsert("touches", columns).run(conn, [tuple(at(v) if k == "created_at" else v for k, v in row.items()) + ("1:bulk",)])
        conn.execute(insert(touches), [{**row, "idempotency_key": "1:core"}])
    with store.connect() as conn:
        stored = conn.execute(select(touches).order_by(touches.c.idempotency_key)).mappings().all()
        raw = conn.execute(text("SELECT CAST(created_at AS TEXT) FROM touches ORDER BY idempotency_key")).scalars().all()
    bulk, core = ({k: v for k, v in r.items() if k not in ("id", "idempotency_key")} for r in stored)
    assert bulk == core and bulk["subject"] == "Un été à Paris\ttab" and bulk["error"] is None
    assert raw[0] == raw[1]


def test_sqlite_checkpoints_in_large_steps(tmp_path):
    from relance.store import Store

    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    with s.connect() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 10_000
        assert conn.execute(text("PRAGMA journal_size_limit")).scalar() == 64 * 2**20
    s.dispose()


def test_among_matches_ids_and_keys_whatever_they_hold(store):
    """`among` binds a batch's values as one array (binary on PostgreSQL): keys with quotes,
    commas, braces and backslashes, non-ASCII, and an empty batch all match exactly."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from relance.store import among, prospects, suppressions

    now = datetime(2027, 3, 16, 9, 30, tzinfo=UTC)
    values = ['a"b', "c,d", "{e}", "f\\g", "h i", "été", "NULL", ""]
    with store.begin() as conn:
        conn.execute(prospects.insert(), [{"id": i, "email": f"p{i}@example.com", "created_at": now, "updated_at": now} for i in (1, 2, 3)])
        conn.execute(suppressions.insert(), [{"kind": "email", "value": v, "reason": "test", "created_at": now} for v in values + ["other"]])
    with store.connect() as conn:
        assert sorted(conn.scalars(select(prospects.c.id).where(among(conn, prospects.c.id, [3, 1, 99])))) == [1, 3]
        assert conn.scalars(select(prospects.c.id).where(among(conn, prospects.c.id, []))).all() == []
        assert sorted(conn.scalars(select(suppressions.c.value).where(among(conn, suppressions.c.value, values)))) == sorted(values)
        assert conn.scalars(select(suppressions.c.value).where(among(conn, suppressions.c.value, []))).all() == []


def _alive_checkpointers() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "relance-wal-checkpoint"]


def test_a_background_checkpoint_copies_the_wal_into_the_database_file(tmp_path):
    """Read the database file alone (a copy without its WAL): the rows are there once the
    background checkpoint ran, while the writer's connection is still open."""
    import shutil
    import sqlite3
    import time

    from relance.store import Store

    tmp_path = tmp_path / "a dir %20 é"  # the checkpoint thread opens the file by URI
    tmp_path.mkdir()
    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    with s.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.exec_driver_sql("INSERT INTO t (x) VALUES (?)", [(i,) for i in range(5000)])

    def rows_in_the_file_alone() -> int:
        shutil.copyfile(tmp_path / "r.db", tmp_path / "copy.db")
        with sqlite3.connect(tmp_path / "copy.db") as copy:
            try:
                return copy.execute("SELECT count(*) FROM t").fetchone()[0]
            except sqlite3.OperationalError:  # the table itself is still only in the WAL
                return 0

    assert rows_in_the_file_alone() == 0  # under the auto-checkpoint threshold: all in the WAL
    s.checkpoint_in_background()
    deadline = time.monotonic() + 10
    while rows_in_the_file_alone() != 5000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rows_in_the_file_alone() == 5000
    assert len(_alive_checkpointers()) == 1
    s.dispose()
    assert _alive_checkpointers() == []
    assert not (tmp_path / "r.db-wal").exists()  # the last close still checkpointed and removed it
    # A disposed store opens again, and checkpoints again.
    with s.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t (x) VALUES (?)", [(i,) for i in range(10)])
    s.checkpoint_in_background()
    s.dispose()
    with sqlite3.connect(tmp_path / "r.db") as check:
        assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 5010


def test_background_checkpoints_are_for_sqlite_files_only(store):
    from relance.store import Store

    memory = Store("sqlite://")
    memory.checkpoint_in_background()
    assert memory._checkpointer is None
    memory.dispose()
    store.checkpoint_in_background()
    assert (store._checkpointer is None) is store.is_postgres

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

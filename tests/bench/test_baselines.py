"""The bench's ground: its seeded stores hold what they claim, and its floor does the very
work dispatch does, so a ratio against it compares like with like (issue 3)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from bench.common import NOW, STEPS, count, count_due, seed, write_workspace
from bench.throughput import floor, touch_rows_digest, touch_work
from relance.dispatch import Dispatcher
from relance.store import Store, enrollments
from relance.workspace import Workspace
from tests.conftest import database_url


def test_seed_holds_the_due_enrollments_it_was_asked_for_among_the_rest(store: Store) -> None:
    seed(store, 1_000, due=40)

    assert count(store, "SELECT count(*) FROM prospects") == 1_000
    assert count(store, "SELECT count(*) FROM enrollments") == 1_000
    assert count_due(store) == 40
    # Spread through the table, not bunched at its start: the due query must find them by index.
    with store.connect() as conn:
        due_ids = conn.scalars(select(enrollments.c.id).where(enrollments.c.next_due_at <= NOW)).all()
    assert min(due_ids) < 100 and max(due_ids) > 900
    assert count(store, "SELECT count(DISTINCT next_step_id) FROM enrollments WHERE next_step_id IS NOT NULL") == len(STEPS)


def _dispatched(root: Path) -> dict:
    ws = Workspace.load(root)
    summary = Dispatcher(ws).run(NOW)
    ws.close()
    return summary.as_dict()


def test_the_floor_writes_the_very_touch_rows_dispatch_writes(backend: str, tmp_path: Path) -> None:
    n = 250
    digests = {}
    for mode in ("floor", "dispatch"):
        (tmp_path / mode).mkdir()
        url = database_url(backend, tmp_path / mode)
        store = Store(url)
        seed(store, n)
        store.dispose()
        root = write_workspace(tmp_path / f"ws-{mode}", url)
        if mode == "floor":
            work = touch_work(url, root)
            assert len(work) == n
            floor(url, work, batch=100)
        else:
            summary = _dispatched(root)
            assert summary["claimed"] == n and sum(summary["sent"].values()) == n
        digests[mode] = touch_rows_digest(url)

    assert digests["floor"] == digests["dispatch"]


def test_the_digest_tells_touch_rows_apart(tmp_path: Path) -> None:
    url = database_url("sqlite", tmp_path)
    store = Store(url)
    seed(store, 30)
    store.dispose()
    floor(url, touch_work(url, write_workspace(tmp_path / "ws", url)), batch=100)
    before = touch_rows_digest(url)
    store = Store(url, migrate=False)
    with store.begin() as conn:
        conn.exec_driver_sql("UPDATE touches SET recipient = recipient || '!' WHERE id = 7")
    store.dispose()

    assert touch_rows_digest(url) != before

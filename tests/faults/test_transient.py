"""Issue 3, item 9: a provider failing a share of sends, transiently or for good.

Transient failures must be retried until everything is sent, each touch exactly once, never
sooner than the provider's Retry-After; terminal ones must stop at the first attempt and
leave their reason where a person looks (the touch, the paused enrollment, `relance status`).
The sandbox draws each attempt's fate from the seed and the key, so these runs replay.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import pairwise
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from relance.cli import app
from relance.dispatch import Dispatcher
from relance.store import enrollments, events, touches
from relance.workspace import Workspace
from tests.conftest import database_url
from tests.faults import START, enroll_many, enrollment_rows, eml_per_key, fault_workspace, iso, sandbox_table, touch_rows

ENROLLMENTS = 100  # four batches of 25


def open_ws(backend: str, tmp_path: Path, settings: str, max_attempts: int = 5) -> Workspace:
    root = fault_workspace(tmp_path / "ws", database_url(backend, tmp_path), email_settings=settings, max_attempts=max_attempts)
    ws = Workspace.load(root)
    enroll_many(ws, ENROLLMENTS)
    return ws


def backoff(attempts: int, retry_after: float | None) -> timedelta:
    """The engine's promise after the n-th failed attempt: exponential, never under Retry-After."""
    return timedelta(seconds=max(retry_after or 0.0, 60.0 * 2 ** (attempts - 1)))


def status_output(ws: Workspace, now: datetime) -> str:
    result = CliRunner().invoke(app, ["status", "-w", str(ws.root), "--at", iso(now)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("retry_after", [900.0, None], ids=["retry-after", "no-retry-after"])
def test_transient_faults_are_retried_after_their_backoff_until_each_touch_is_sent_once(backend: str, tmp_path: Path, retry_after: float | None):
    """Dispatch on a simulated clock that jumps to the next due time, like the scheduler,
    until every first touch is out; check every attempt against the promised backoff."""
    settings = "fail_rate: 0.3" + (f", retry_after_seconds: {retry_after}" if retry_after else "")
    ws = open_ws(backend, tmp_path, settings, max_attempts=10)  # 0.3 ** 10: nobody runs out of attempts
    attempted_at: dict[str, list[datetime]] = defaultdict(list)
    retried_in_run: list[int] = []
    now = START
    for _ in range(100):
        before = {t.idempotency_key: t.attempts for t in touch_rows(ws)}
        summary = Dispatcher(ws).run(now)
        retried_in_run.append(sum(summary.retried.values()))
        rows = touch_rows(ws, touches.c.step_id == "intro")
        due = {e.id: e.next_due_at for e in enrollment_rows(ws).values()}
        for t in rows:
            tried = t.attempts - before.get(t.idempotency_key, 0)
            assert tried in (0, 1), "one attempt per touch per run"
            if tried:
                attempted_at[t.idempotency_key].append(now)
            if tried and t.status == "retry":
                assert due[t.enrollment_id] >= now + backoff(t.attempts, retry_after), (t.idempotency_key, t.attempts)
        pending = [e for e in enrollment_rows(ws).values() if e.next_step_id == "intro"]
        if not pending:
            break
        assert all(e.state == "active" for e in pending), "a transient fault paused an enrollment"
        now = max(now + timedelta(seconds=1), min(e.next_due_at for e in pending))
    else:
        pytest.fail("touches still unsent after 100 dispatch runs")

    rows = touch_rows(ws, touches.c.step_id == "intro")
    keys = {t.idempotency_key for t in rows}
    assert len(rows) == len(keys) == ENROLLMENTS and {t.status for t in rows} == {"sent"}
    assert eml_per_key(ws) == {k: 1 for k in keys}  # sent exactly once, provider side
    assert set(sandbox_table(ws, "accepted")) == keys
    with ws.store.connect() as conn:
        performed = Counter(conn.scalars(select(events.c.touch_id).where(events.c.kind == "sent")))
    assert performed == {t.id: 1 for t in rows}
    # Every attempt is counted, by the engine and by the provider alike.
    provider_attempts = sandbox_table(ws, "attempts")
    assert {t.idempotency_key: t.attempts for t in rows} == provider_attempts
    assert {k: len(v) for k, v in attempted_at.items()} == provider_attempts
    retried = [t for t in rows if t.attempts > 1]
    assert len(retried) >= ENROLLMENTS // 5 and max(t.attempts for t in rows) >= 3
    assert sum(retried_in_run) == sum(t.attempts - 1 for t in rows)
    # No attempt came sooner than the backoff the previous failure asked for.
    for key, times in attempted_at.items():
        for n, (earlier, later) in enumerate(pairwise(times), 1):
            assert later - earlier >= backoff(n, retry_after), (key, n, times)
    ws.close()


def test_transient_faults_stop_after_max_attempts_with_the_reason_kept(backend: str, tmp_path: Path):
    """A provider that never recovers: retrying forever would hide it, so the last attempt
    fails the touch like a terminal error would."""
    ws = open_ws(backend, tmp_path, "fail_rate: 1.0, retry_after_seconds: 60", max_attempts=3)
    now = START
    for _ in range(5):
        Dispatcher(ws).run(now)
        now += timedelta(hours=1)
    rows = touch_rows(ws, touches.c.step_id == "intro")
    assert len(rows) == ENROLLMENTS and {(t.status, t.attempts) for t in rows} == {("failed", 3)}
    assert all(t.error.startswith("TransientError: sandbox: simulated provider outage") for t in rows)
    assert set(sandbox_table(ws, "attempts").values()) == {3} and not sandbox_table(ws, "accepted")
    assert {(e.state, "failed: TransientError" in e.reason) for e in enrollment_rows(ws).values()} == {("paused", True)}
    ws.close()


def test_terminal_faults_stop_at_once_and_show_their_reason(backend: str, tmp_path: Path):
    ws = open_ws(backend, tmp_path, "fail_rate: 0.3, fail_kind: terminal")
    first = Dispatcher(ws).run(START)
    for days in (1, 2, 3, 6):  # later runs move the others on, and never retry the rejected
        Dispatcher(ws).run(START + timedelta(days=days))
    rows = touch_rows(ws, touches.c.step_id == "intro")
    failed = [t for t in rows if t.status == "failed"]
    assert 0 < len(failed) < ENROLLMENTS and {t.status for t in rows} == {"sent", "failed"}
    assert first.failed == {"email": len(failed)} and not first.retried

    attempts = sandbox_table(ws, "attempts")
    emls = eml_per_key(ws)
    enrolled = enrollment_rows(ws)
    for t in failed:
        reason = f"TerminalError: sandbox: simulated permanent rejection of {t.idempotency_key}"
        assert t.attempts == 1 and attempts[t.idempotency_key] == 1  # one attempt, on both sides
        assert t.error == reason and t.idempotency_key not in emls
        assert any(reason in e for e in first.errors)
        e = enrolled[t.enrollment_id]
        assert e.state == "paused" and e.reason == f"step 'intro' failed: {reason}" and e.next_step_id == "intro"
    with ws.store.connect() as conn:
        failures = conn.execute(select(events.c.touch_id, events.c.detail).where(events.c.kind == "failed")).all()
    assert sorted(f.touch_id for f in failures) == [t.id for t in failed]
    assert all("simulated permanent rejection" in f.detail for f in failures)
    # The others went on with the cadence.
    with ws.store.connect() as conn:
        moved = conn.scalar(select(enrollments.c.id).where(enrollments.c.state != "paused", enrollments.c.next_step_id == "intro").limit(1))
    assert moved is None

    out = status_output(ws, START + timedelta(days=6))
    assert f"'paused': {len(failed)}" in out and f"'failed': {len(failed)}" in out
    problems = out.split("Failed, retrying or unknown touches", 1)[1]
    shown = [line for line in problems.splitlines() if "simulated permanent rejection" in line]
    assert len(shown) == min(20, len(failed)) and all("failed" in line for line in shown)
    paused = out.split("Paused (need a person)", 1)[1].split("Failed, retrying", 1)[0]
    assert "step 'intro' failed: TerminalError: sandbox: simulated permanent rejection" in paused
    ws.close()

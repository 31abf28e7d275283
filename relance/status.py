"""Operational state at a glance: what is due, what is stuck, and why."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from relance.store import enrollments, tasks, touches
from relance.workspace import Workspace


def count_due(ws: Workspace, now: datetime) -> int:
    with ws.store.connect() as conn:
        return conn.scalar(
            select(func.count()).select_from(enrollments).where(enrollments.c.state == "active", enrollments.c.next_due_at <= now)
        ) or 0


def next_due(ws: Workspace) -> datetime | None:
    """The earliest due time of any active enrollment (the simulated clock jumps to it)."""
    with ws.store.connect() as conn:
        return conn.scalar(select(func.min(enrollments.c.next_due_at)).where(enrollments.c.state == "active"))


def status(ws: Workspace, now: datetime, limit: int = 20) -> dict[str, Any]:
    with ws.store.connect() as conn:
        by_state = dict(conn.execute(select(enrollments.c.state, func.count()).group_by(enrollments.c.state)).all())
        by_touch = dict(conn.execute(select(touches.c.status, func.count()).group_by(touches.c.status)).all())
        stuck = conn.execute(
            select(enrollments.c.id, enrollments.c.sequence, enrollments.c.next_step_id, enrollments.c.reason)
            .where(enrollments.c.state == "paused")
            .order_by(enrollments.c.updated_at.desc())
            .limit(limit)
        ).all()
        failures = conn.execute(
            select(touches.c.id, touches.c.sequence, touches.c.step_id, touches.c.status, touches.c.error)
            .where(touches.c.status.in_(("failed", "unknown", "retry")))
            .order_by(touches.c.created_at.desc())
            .limit(limit)
        ).all()
        open_tasks = conn.scalar(select(func.count()).select_from(tasks).where(tasks.c.status == "open")) or 0
    return {
        "enrollments": by_state,
        "touches": by_touch,
        "due_now": count_due(ws, now),
        "open_tasks": open_tasks,
        "paused": [dict(r._mapping) for r in stuck],
        "problems": [dict(r._mapping) for r in failures],
    }

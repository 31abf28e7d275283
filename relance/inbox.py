"""The SDR's task inbox: manual calls, LinkedIn actions and tasks, and their outcomes.

Closing a task records its outcome as an event, so conditions (`call_outcome('call-1')`)
and exits (`meeting_booked`) see it exactly like a provider's response.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from relance import rules
from relance.errors import UserInputError
from relance.events import TASK_OUTCOMES, EventKind
from relance.ingest import insert_events
from relance.store import prospects, tasks, touches
from relance.workspace import Workspace

CALL_KINDS = {EventKind.call_connected, EventKind.call_voicemail, EventKind.call_no_answer, EventKind.call_wrong_number}


def open_tasks(ws: Workspace, now: datetime, owner: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    query = (
        select(tasks, prospects.c.first_name, prospects.c.last_name, prospects.c.company, prospects.c.phone, prospects.c.linkedin_url)
        .join(prospects, prospects.c.id == tasks.c.prospect_id)
        .where(tasks.c.status == "open", tasks.c.due_at <= now)
        .order_by(tasks.c.due_at, tasks.c.id)
        .limit(limit)
    )
    if owner:
        query = query.where(tasks.c.owner == owner)
    with ws.store.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def complete_task(ws: Workspace, task_id: int, outcome: str, now: datetime, note: str | None = None) -> EventKind:
    """Close a task with an outcome (connected, voicemail, meeting_booked, accepted, ...)."""
    kind = TASK_OUTCOMES.get(outcome)
    if kind is None:
        raise UserInputError(f"unknown outcome {outcome!r}: use one of {', '.join(TASK_OUTCOMES)}", key="--outcome")
    with ws.store.begin() as conn:
        row = conn.execute(
            select(tasks, touches.c.sequence, touches.c.step_id, touches.c.sender, touches.c.idempotency_key)
            .join(touches, touches.c.id == tasks.c.touch_id)
            .where(tasks.c.id == task_id)
        ).first()
        if row is None:
            raise UserInputError(f"no task {task_id}")
        if row.status != "open":
            raise UserInputError(f"task {task_id} is already {row.status} ({row.outcome})")
        status = "skipped" if kind == EventKind.task_skipped else "done"
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(status=status, outcome=outcome, note=note, done_at=now))
        base = {
            "occurred_at": now, "recorded_at": now, "channel": row.channel, "detail": outcome,
            "prospect_id": row.prospect_id, "enrollment_id": row.enrollment_id, "touch_id": row.touch_id,
            "sequence": row.sequence, "step_id": row.step_id, "variant": None, "sender": row.sender,
            "payload": {"note": note} if note else {},
        }
        new = []
        if kind in CALL_KINDS or (row.channel == "call" and kind == EventKind.meeting_booked):
            new.append({**base, "kind": EventKind.sent.value, "dedupe_key": f"task:{task_id}:attempt"})  # the call was placed
        if row.channel == "linkedin" and kind != EventKind.task_skipped:
            performed = {"visit": EventKind.visited, "invite": EventKind.invited, "message": EventKind.messaged}[row.action]
            new.append({**base, "kind": performed.value, "dedupe_key": f"task:{task_id}:performed"})
        new.append({**base, "kind": kind.value, "dedupe_key": f"task:{task_id}:outcome"})
        fresh = insert_events(conn, ws.store.is_postgres, new)
        rules.apply(conn, ws, fresh, now)
    return kind

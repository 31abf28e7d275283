"""Enrolling prospects into a sequence: refuse the suppressed and the already busy, then
create each enrollment at its first step with its first due time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, insert, select

from relance.planning import due_at, pick_sender
from relance.spec import Sequence
from relance.store import enrollments, prospects
from relance.suppression import suppressed_ids
from relance.workspace import Workspace

CHUNK = 1000
PROSPECT_COLUMNS = [
    prospects.c.id, prospects.c.email, prospects.c.first_name, prospects.c.last_name, prospects.c.company,
    prospects.c.title, prospects.c.phone, prospects.c.linkedin_url, prospects.c.timezone, prospects.c.country,
    prospects.c.language, prospects.c.account_key, prospects.c.attributes, prospects.c.erased_at,
]


@dataclass
class EnrollReport:
    sequence: str
    enrolled: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


def enroll(ws: Workspace, seq: Sequence, prospect_ids: Iterable[int], now: datetime) -> EnrollReport:
    """Enroll in chunks; each skipped prospect is counted under the reason it was refused."""
    report = EnrollReport(seq.name)
    ids = list(dict.fromkeys(prospect_ids))
    for start in range(0, len(ids), CHUNK):
        with ws.store.begin() as conn:
            enroll_chunk(conn, ws, seq, ids[start : start + CHUNK], now, report)
    return report


def enroll_chunk(conn, ws: Workspace, seq: Sequence, ids: list[int], now: datetime, report: EnrollReport) -> None:
    rows = [dict(r._mapping) for r in conn.execute(select(*PROSPECT_COLUMNS).where(prospects.c.id.in_(ids)))]
    if len(rows) < len(ids):
        report.skipped["unknown prospect"] += len(ids) - len(rows)
    suppressed = suppressed_ids(conn, rows)
    in_this = set(
        conn.scalars(select(enrollments.c.prospect_id).where(enrollments.c.sequence == seq.name, enrollments.c.prospect_id.in_(ids)))
    )
    busy: set[int] = set()
    if seq.exclusive:
        busy = set(
            conn.scalars(
                select(enrollments.c.prospect_id).where(
                    and_(
                        enrollments.c.prospect_id.in_(ids),
                        enrollments.c.exclusive == 1,
                        enrollments.c.state.in_(("active", "paused")),
                    )
                )
            )
        )
    first = seq.steps[0]
    new = []
    for row in rows:
        pid = row["id"]
        if row["erased_at"] is not None:
            report.skipped["erased on request"] += 1
        elif pid in suppressed:
            report.skipped[f"suppressed: {suppressed[pid]}"] += 1
        elif pid in in_this:
            report.skipped["already in this sequence"] += 1
        elif pid in busy:
            report.skipped["active in another exclusive sequence"] += 1
        else:
            sender = pick_sender(ws.config, seq.sender.pool, row["email"] or str(pid)) if seq.sender else None
            new.append(
                {
                    "prospect_id": pid,
                    "sequence": seq.name,
                    "exclusive": 1 if seq.exclusive else 0,
                    "state": "active",
                    "next_step_id": first.id,
                    "next_due_at": due_at(seq, first, row, ws.config, now),
                    "sender": sender,
                    "attempts": 0,
                    "enrolled_at": now,
                    "updated_at": now,
                }
            )
    if new:
        conn.execute(insert(enrollments), new)
    report.enrolled += len(new)

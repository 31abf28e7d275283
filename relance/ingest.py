"""Ingest: normalised responses from connectors into the event log, rules applied at once.

Each event is matched to the touch it answers (by our touch id, idempotency key, the
provider's message id, or the Message-ID a reply quotes), recorded once thanks to its
dedupe key, and handed to the rules in the same transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.dialects import postgresql, sqlite

from relance import rules
from relance.channels import Capability, InboundEvent
from relance.events import Channel
from relance.store import events, prospects, touches
from relance.workspace import Workspace

CHUNK = 2000


@dataclass
class IngestSummary:
    received: int = 0
    recorded: int = 0
    duplicates: int = 0
    unmatched: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    exited: int = 0
    suppressed: int = 0

    def merge(self, other: "IngestSummary") -> None:
        for name in ("received", "recorded", "duplicates", "unmatched", "exited", "suppressed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.kinds.update(other.kinds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received, "recorded": self.recorded, "duplicates": self.duplicates,
            "unmatched": self.unmatched, "exited": self.exited, "suppressed": self.suppressed, "kinds": dict(self.kinds),
        }


def ingest(ws: Workspace, inbound: Iterable[InboundEvent], now: datetime) -> IngestSummary:
    """Record and apply events in chunks; a chunk is one transaction."""
    summary = IngestSummary()
    chunk: list[InboundEvent] = []
    for event in inbound:
        chunk.append(event)
        if len(chunk) >= CHUNK:
            summary.merge(_ingest_chunk(ws, chunk, now))
            chunk = []
    if chunk:
        summary.merge(_ingest_chunk(ws, chunk, now))
    return summary


def _ingest_chunk(ws: Workspace, chunk: list[InboundEvent], now: datetime) -> IngestSummary:
    summary = IngestSummary(received=len(chunk))
    with ws.store.begin() as conn:
        matched = _match(conn, chunk)
        rows = []
        for event in chunk:
            touch = matched.get(id(event))
            prospect_id = touch.prospect_id if touch is not None else _prospect_by_recipient(conn, event.recipient)
            if touch is None and prospect_id is None:
                summary.unmatched += 1
            rows.append(
                {
                    "occurred_at": event.occurred_at,
                    "recorded_at": now,
                    "kind": event.kind.value,
                    "channel": event.channel.value,
                    "detail": (event.detail or None) and str(event.detail)[:200],
                    "prospect_id": prospect_id,
                    "enrollment_id": touch.enrollment_id if touch is not None else None,
                    "touch_id": touch.id if touch is not None else None,
                    "sequence": touch.sequence if touch is not None else None,
                    "step_id": touch.step_id if touch is not None else None,
                    "variant": touch.variant if touch is not None else None,
                    "sender": touch.sender if touch is not None else None,
                    "payload": dict(event.payload),
                    "dedupe_key": event.dedupe_key[:300],
                }
            )
        fresh = insert_events(conn, ws.store.is_postgres, rows)
        summary.recorded = len(fresh)
        summary.duplicates = len(rows) - len(fresh)
        summary.kinds.update(r["kind"] for r in fresh)
        effects = rules.apply(conn, ws, fresh, now)
        summary.exited = effects.get("exited", 0)
        summary.suppressed = effects.get("suppressed", 0)
    return summary


def insert_events(conn: Any, is_postgres: bool, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert, ignoring dedupe-key conflicts; return the rows that were new."""
    if not rows:
        return []
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique.setdefault(row["dedupe_key"], row)
    dialect_insert = postgresql.insert if is_postgres else sqlite.insert
    stmt = dialect_insert(events).on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(events.c.dedupe_key)
    inserted = set(conn.execute(stmt, list(unique.values())).scalars().all())
    return [row for key, row in unique.items() if key in inserted]


def _match(conn: Any, chunk: list[InboundEvent]) -> dict[int, Any]:
    """Find each event's touch with at most four IN queries for the whole chunk."""
    columns = (touches.c.id, touches.c.prospect_id, touches.c.enrollment_id, touches.c.sequence, touches.c.step_id,
               touches.c.variant, touches.c.sender, touches.c.idempotency_key, touches.c.provider_message_id, touches.c.message_id)
    lookups = (
        ("touch_id", touches.c.id, "id"),
        ("idempotency_key", touches.c.idempotency_key, "idempotency_key"),
        ("provider_message_id", touches.c.provider_message_id, "provider_message_id"),
        ("message_id", touches.c.message_id, "message_id"),
    )
    found: dict[int, Any] = {}
    for attr, column, key in lookups:
        wanted = {getattr(e, attr) for e in chunk if id(e) not in found and getattr(e, attr)}
        if not wanted:
            continue
        by_value = {getattr(r, key): r for r in conn.execute(select(*columns).where(column.in_(wanted)))}
        for event in chunk:
            if id(event) not in found and getattr(event, attr) in by_value:
                found[id(event)] = by_value[getattr(event, attr)]
    return found


def _prospect_by_recipient(conn: Any, recipient: str | None) -> int | None:
    if not recipient:
        return None
    value = recipient.strip()
    return conn.scalar(
        select(prospects.c.id).where(
            or_(prospects.c.email == value.lower(), prospects.c.linkedin_url == value, prospects.c.phone == value)
        ).limit(1)
    )


def poll_all(ws: Workspace, now: datetime) -> IngestSummary:
    """Poll every configured connector that polls, and ingest what they return."""
    summary = IngestSummary()
    for channel in ws.config.connectors:
        connector = ws.connector(Channel(channel))
        if Capability.polling in type(connector).capabilities:
            while batch := list(connector.poll(now)):  # connectors hand responses over in chunks
                summary.merge(ingest(ws, batch, now))
    return summary

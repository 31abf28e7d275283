"""Cadence rules: which events end an enrollment, what suppresses a contact, where an
ended enrollment is routed next (`on_exit`), how long an out-of-office holds one back.
Applied in the same transaction that records the event, so a reply stops the cadence now,
not at the next tick."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import String, bindparam, cast, insert, literal, null, select, update

from relance.events import Channel, EventKind, SUPPRESSING_KINDS
from relance.planning import calendar_for, due_at
from relance.spec import Sequence
from relance.store import UTCDateTime, among, enrollments, events, prospects
from relance.suppression import suppress

# Kinds that end every cadence of the prospect whatever its exit_on says.
ALWAYS_EXIT = frozenset({EventKind.unsubscribed.value, EventKind.complained.value})


def exit_kinds(seq: Sequence) -> frozenset[str]:
    """exit_on plus every outcome on_exit routes (an outcome that routes must also end)."""
    return frozenset({k.value for k in seq.exit_on} | {k for k in seq.on_exit if k != "completed"} | ALWAYS_EXIT)


def ends(seq: Sequence | None, kind: str, detail: str | None) -> bool:
    if kind == EventKind.bounced.value and detail == "soft":
        return False  # a full mailbox is not a dead address
    if seq is None:
        return kind in ALWAYS_EXIT
    return kind in exit_kinds(seq)


def finish_enrollments(conn: Any, ws: Any, ids: Iterable[int], kind: str, reason: str, now: datetime) -> None:
    """End enrollments (completed, or exited on `kind`) and route them per on_exit."""
    ids = list(ids)
    if not ids:
        return
    state = "completed" if kind == "completed" else "exited"
    rows = conn.execute(
        select(enrollments.c.id, enrollments.c.prospect_id, enrollments.c.sequence).where(
            among(conn, enrollments.c.id, ids), enrollments.c.state.in_(("active", "paused"))
        )
    ).all()
    if not rows:
        return
    conn.execute(
        update(enrollments)
        .where(among(conn, enrollments.c.id, [r.id for r in rows]))
        .values(state=state, reason=reason, next_due_at=None, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    if state == "completed":  # one statement, not a row per enrollment: dispatch completes thousands
        at = literal(now, UTCDateTime())
        conn.execute(
            insert(events).from_select(
                ["occurred_at", "recorded_at", "kind", "channel", "prospect_id", "enrollment_id", "sequence", "payload", "dedupe_key"],
                select(
                    at, at, literal(EventKind.completed.value), null(), enrollments.c.prospect_id, enrollments.c.id,
                    enrollments.c.sequence, literal({}, events.c.payload.type),
                    "enrollment:" + cast(enrollments.c.id, String) + ":completed",
                ).where(among(conn, enrollments.c.id, [r.id for r in rows])),
            )
        )
    routes: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        seq = ws.sequences.get(r.sequence)
        target = seq.on_exit.get(kind) if seq else None
        if target is not None:
            routes[target.enroll].append(r.prospect_id)
    from relance.enrollment import EnrollReport, enroll_chunk

    for target, prospect_ids in routes.items():
        seq = ws.sequences.get(target)
        if seq is not None:
            enroll_chunk(conn, ws, seq, prospect_ids, now, EnrollReport(target))


def apply(conn: Any, ws: Any, new_events: list[Mapping[str, Any]], now: datetime) -> dict[str, int]:
    """Apply the rules of freshly recorded events; returns counts of what they caused."""
    counts: dict[str, int] = defaultdict(int)
    prospect_ids = {e["prospect_id"] for e in new_events if e.get("prospect_id") is not None}
    if not prospect_ids:
        return counts
    active = defaultdict(list)
    for r in conn.execute(
        select(enrollments.c.id, enrollments.c.prospect_id, enrollments.c.sequence).where(
            enrollments.c.prospect_id.in_(prospect_ids), enrollments.c.state.in_(("active", "paused"))
        )
    ):
        active[r.prospect_id].append(r)
    contacts = {
        r.id: r
        for r in conn.execute(
            select(prospects.c.id, prospects.c.email, prospects.c.phone, prospects.c.linkedin_url).where(prospects.c.id.in_(prospect_ids))
        )
    }
    to_finish: dict[str, list[int]] = defaultdict(list)
    for ev in new_events:
        pid, kind, detail = ev.get("prospect_id"), ev["kind"], ev.get("detail")
        if pid is None:
            continue
        contact = contacts.get(pid)
        if contact is not None:
            counts["suppressed"] += _suppress_for(conn, contact, kind, detail, ev.get("channel"), now)
        for enr in active[pid]:
            same = enr.id == ev.get("enrollment_id")
            seq = ws.sequences.get(enr.sequence)
            # A reply, meeting or opt-out ends every cadence of the prospect that exits on it;
            # a bounce ends only the one that bounced (the other channels may still be open).
            if kind == EventKind.bounced.value and not same:
                continue
            if ends(seq, kind, detail) and enr.id not in to_finish[kind]:
                to_finish[kind].append(enr.id)
    for kind, ids in to_finish.items():
        counts["exited"] += len(ids)
        finish_enrollments(conn, ws, ids, kind, f"{kind} received", now)
    ending = {i for ids in to_finish.values() for i in ids}
    absent = [e for e in new_events if e["kind"] == EventKind.auto_replied.value and e.get("prospect_id") is not None]
    if absent:
        counts["deferred"] += defer_for_absence(conn, ws, absent, active, ending, now)
    return counts


# --------------------------------------------------------------------------- auto-replies

# How long an out-of-office without a return date holds the cadence back.
DEFAULT_ABSENCE = timedelta(days=7)
MAX_ABSENCE = timedelta(days=366)


def return_day(detail: str | None) -> date | None:
    """The return date an auto_replied event carries in `detail` (ISO), if any."""
    try:
        return date.fromisoformat(detail) if detail else None
    except ValueError:
        return None


def resume_at(seq: Sequence, prospect: Mapping[str, Any], config: Any, back: date | None, replied_at: datetime, now: datetime) -> datetime:
    """First opening of the enrollment's own calendar once the person is back: the morning
    of the return date in the prospect's zone, else DEFAULT_ABSENCE after the auto-reply.
    A return date more than MAX_ABSENCE away is taken for a misreading and ignored."""
    if back is not None and back > (now + MAX_ABSENCE).date():
        back = None
    if back is not None:
        zone = calendar_for(seq.schedule, prospect, config).zone
        start = datetime.combine(back, time(0, 0), zone)
    else:
        start = replied_at + DEFAULT_ABSENCE
    return due_at(seq, None, prospect, config, max(start, now))


def defer_for_absence(
    conn: Any, ws: Any, absent: list[Mapping[str, Any]], active: Mapping[int, list[Any]], ending: set[int], now: datetime
) -> int:
    """An out-of-office does not end a cadence: it holds the prospect's active enrollments
    until the return date. They stay active with a later next_due_at, so they resume by
    themselves with no second event; a due time already later is left alone."""
    latest: dict[int, tuple[date | None, datetime]] = {}
    for ev in absent:  # several auto-replies in one batch: the latest return wins
        pid, back = ev["prospect_id"], return_day(ev.get("detail"))
        seen = latest.get(pid)
        if seen is None or (back or date.min) > (seen[0] or date.min):
            latest[pid] = (back, ev.get("occurred_at") or now)
    people = {
        r.id: dict(r._mapping)
        for r in conn.execute(
            select(prospects.c.id, prospects.c.timezone, prospects.c.country).where(prospects.c.id.in_(list(latest)))
        )
    }
    later: list[dict[str, Any]] = []
    for pid, (back, replied_at) in latest.items():
        for enr in active.get(pid, ()):
            seq = ws.sequences.get(enr.sequence)
            if enr.id in ending or seq is None or pid not in people:
                continue
            later.append({"e_id": enr.id, "when": resume_at(seq, people[pid], ws.config, back, replied_at, now), "now": now})
    if not later:
        return 0
    result = conn.execute(
        update(enrollments)
        .where(
            enrollments.c.id == bindparam("e_id"),
            enrollments.c.state == "active",
            enrollments.c.next_due_at < bindparam("when"),
        )
        .values(next_due_at=bindparam("when"), updated_at=bindparam("now")),
        later,
    )
    return max(result.rowcount, 0)


def _suppress_for(conn: Any, contact: Any, kind: str, detail: str | None, channel: str | None, now: datetime) -> int:
    added = 0
    if kind in {k.value for k in SUPPRESSING_KINDS}:
        for ckind, value in (("email", contact.email), ("phone", contact.phone), ("linkedin", contact.linkedin_url)):
            if value:
                added += suppress(conn, ckind, value, kind, source=f"{channel or 'unknown'} event", now=now) or 0
    elif kind == EventKind.bounced.value and detail != "soft" and contact.email:
        added += suppress(conn, "email", contact.email, "hard bounce", source="email event", now=now) or 0
    elif kind == EventKind.call_wrong_number.value and contact.phone and channel == Channel.call.value:
        added += suppress(conn, "phone", contact.phone, "wrong number", source="call outcome", now=now) or 0
    return added

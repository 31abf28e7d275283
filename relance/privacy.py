"""Personal data: erased on request (GDPR), and expired after the retention period.

Both keep the rows, so reports over the past stay right, and blank what identified the
person wherever the store holds it: their prospect row, their touches' recipients, subjects
and errors, their tasks, their events' provider payloads (a reply's sender and subject, a
bounce's diagnostic) and the address in an event's detail. A suppression naming them (an
opt-out, a bounce) is kept as a SHA-256 with its reason, so they stay out of reach without
the store keeping who they were.

The two differ in what follows. An erasure also leaves SHA-256s marked `erased`, so a later
import of the same person is refused, and ends their cadences. An expiry takes only
prospects idle for the retention period (no cadence running or paused, nothing imported,
changed or heard of since) and refuses nothing: imported again later, they are someone new.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, or_, select, update
from sqlalchemy.engine import Connection

from relance.errors import ProspectError
from relance.store import Store, enrollments, events, prospects, suppressions, tasks, touches
from relance.suppression import ERASED, HASHED_KINDS, hash_identifier, phone_identity, suppress, suppress_many

ONGOING = ("active", "paused")
_IDENTITY = (prospects.c.email, prospects.c.linkedin_url, prospects.c.phone, prospects.c.first_name, prospects.c.last_name)


def identities(values: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """What an erasure hashes, in HASHED_KINDS order: email, LinkedIn URL, phone with name."""
    phone = values["phone"] and phone_identity(values["phone"], values["first_name"], values["last_name"])
    return values["email"], values["linkedin_url"], phone


def erase_prospect(conn: Connection, prospect_id: int, now: datetime) -> bool:
    """GDPR erasure on request; False if already erased. Company, country and zone stay as
    report dimensions; their cadences end."""
    row = conn.execute(select(*_IDENTITY, prospects.c.erased_at).where(prospects.c.id == prospect_id)).first()
    if row is None:
        raise ProspectError(f"no prospect #{prospect_id}", key="id")
    if row.erased_at is not None:
        return False
    person = row._mapping
    forget_prospect(conn, prospect_id, person, now)
    for kind, value in zip(HASHED_KINDS, identities(person)):
        if value:
            digest = hash_identifier(value)
            if not suppress(conn, kind, digest, ERASED, source=f"erasure of prospect #{prospect_id}", now=now):
                # The hash was already there for another reason: erasure must still block imports.
                conn.execute(update(suppressions).where(suppressions.c.kind == kind, suppressions.c.value == digest).values(reason=ERASED))
    conn.execute(
        update(enrollments)
        .where(enrollments.c.prospect_id == prospect_id, enrollments.c.state.in_(ONGOING))
        .values(state="exited", reason="erased on request", next_due_at=None, lease_owner=None, lease_expires_at=None, updated_at=now)
    )
    return True


def forget_prospect(conn: Connection, prospect_id: int, person: Mapping[str, Any], now: datetime) -> None:
    """Blank what identified the prospect (`person`: their email, LinkedIn URL, phone and
    names, read before) everywhere the store holds it, and mark them erased."""
    conn.execute(
        update(prospects)
        .where(prospects.c.id == prospect_id)
        .values(email=None, first_name=None, last_name=None, title=None, phone=None, linkedin_url=None, attributes={}, erased_at=now, updated_at=now)
    )
    scrub = _scrubber(person)
    theirs = select(enrollments.c.id).where(enrollments.c.prospect_id == prospect_id)  # indexed, unlike touches.prospect_id
    errors = conn.execute(select(touches.c.id, touches.c.error).where(touches.c.enrollment_id.in_(theirs), touches.c.error.is_not(None))).all()
    conn.execute(update(touches).where(touches.c.enrollment_id.in_(theirs)).values(recipient=None, subject=None))
    _rewrite(conn, touches, "error", [(i, new) for i, text in errors if (new := scrub(text)) != text])
    conn.execute(update(tasks).where(tasks.c.enrollment_id.in_(theirs)).values(title="(erased)", body=None, note=None))
    details = conn.execute(select(events.c.id, events.c.detail).where(events.c.prospect_id == prospect_id, events.c.detail.is_not(None))).all()
    conn.execute(update(events).where(events.c.prospect_id == prospect_id).values(payload={}))
    _rewrite(conn, events, "detail", [(i, new) for i, text in details if (new := scrub(text)) != text])
    _hash_suppressions(conn, person, prospect_id, now)


def _scrubber(person: Mapping[str, Any]) -> Callable[[str], str]:
    """Replaces the person's email, LinkedIn URL, phone and full name in free text (a bounce
    diagnostic quotes the address; a failure reason may)."""
    names = " ".join(n for n in (person["first_name"], person["last_name"]) if n)
    found = [v for v in (person["email"], person["linkedin_url"], person["phone"], names if " " in names else None) if v]
    if not found:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(v) for v in sorted(found, key=len, reverse=True)), re.IGNORECASE)
    return lambda text: pattern.sub("(erased)", text)


def _rewrite(conn: Connection, table: Any, column: str, rows: list[tuple[int, str]]) -> None:
    if rows:
        conn.execute(update(table).where(table.c.id == bindparam("row_id")).values({column: bindparam("text")}), [{"row_id": i, "text": t} for i, t in rows])


def _hash_suppressions(conn: Connection, person: Mapping[str, Any], prospect_id: int, now: datetime) -> None:
    """The plain suppressions of their email and LinkedIn URL become SHA-256s with the same
    reason, which block sends and imports alike. A suppressed phone number stays as it is:
    it may be a switchboard, and it is the number, not the person, that is kept out of reach."""
    plain = [(kind, value) for kind, value in (("email", person["email"]), ("linkedin", person["linkedin_url"])) if value]
    if not plain:
        return
    naming = or_(*(and_(suppressions.c.kind == kind, suppressions.c.value == value) for kind, value in plain))
    for row in conn.execute(select(suppressions.c.id, suppressions.c.kind, suppressions.c.value, suppressions.c.reason).where(naming)).all():
        suppress_many(conn, [(f"{row.kind}_sha256", hash_identifier(row.value), row.reason, f"prospect #{prospect_id} forgotten")], now=now)
        conn.execute(delete(suppressions).where(suppressions.c.id == row.id))


# --------------------------------------------------------------------------- retention
@dataclass
class RetentionSummary:
    days: int
    cutoff: datetime
    expired: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"retention_days": self.days, "cutoff": self.cutoff.isoformat(), "expired": self.expired, "dry_run": self.dry_run}

    def __str__(self) -> str:
        done = "would be blanked" if self.dry_run else "blanked"
        return f"{self.expired} prospect(s) idle since {self.cutoff:%Y-%m-%d} ({self.days} days): personal data {done}"


def _idle_since(cutoff: datetime) -> list[Any]:
    """Conditions on `prospects`: not erased, and nothing about them since `cutoff`: no import
    or change of their row, no cadence running or paused or changed, no event."""
    return [
        prospects.c.erased_at.is_(None),
        prospects.c.updated_at < cutoff,
        ~exists().where(
            enrollments.c.prospect_id == prospects.c.id,
            (enrollments.c.state.in_(ONGOING)) | (enrollments.c.updated_at >= cutoff),
        ),
        ~exists().where(events.c.prospect_id == prospects.c.id, events.c.occurred_at >= cutoff),
    ]


def expire_idle_prospects(store: Store, now: datetime, days: int, *, dry_run: bool = False, batch: int = 500) -> RetentionSummary:
    """Forget every prospect idle for `days`, a transaction per `batch`: a sweep over a large
    store neither holds a long lock nor loads it whole."""
    summary = RetentionSummary(days, cutoff=now - timedelta(days=days), dry_run=dry_run)
    idle = _idle_since(summary.cutoff)
    after = 0
    while True:
        with store.begin() as conn:
            listing = select(prospects.c.id, *_IDENTITY).where(prospects.c.id > after, *idle).order_by(prospects.c.id).limit(batch)
            listed = conn.execute(listing if dry_run else listing.with_for_update()).all()
            if not listed:
                return summary
            after = listed[-1].id
            if dry_run:
                summary.expired += len(listed)
                continue
            # PostgreSQL: their rows are locked now, so an enrollment being created for one of
            # them waits for this batch; one that committed while they were being locked shows
            # in this second look (each statement sees what committed before it) and is spared.
            still = set(conn.scalars(select(prospects.c.id).where(prospects.c.id.in_([row.id for row in listed]), *idle)))
            for row in listed:
                if row.id in still:
                    forget_prospect(conn, row.id, row._mapping, now)
                    summary.expired += 1

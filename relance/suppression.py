"""Suppressions: addresses, domains, phones and profiles that must never be contacted again.

Dispatch checks a whole batch in one query before sending, so an opt-out takes effect before
the next send. Bounces, complaints and opt-outs are permanent: there is no `unsuppress`, and
an import never removes a suppression. A prospect erased on request leaves only SHA-256s
(kinds `email_sha256`, `linkedin_sha256`, and `phone_sha256` of the phone *with the name*, as
a switchboard number is shared), so a later import of the same person is refused without the
store keeping who they were.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import phonenumbers
from sqlalchemy import ARRAY, and_, any_, insert, literal, or_, select, union_all
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from relance.store import suppressions, utcnow

KINDS = ("email", "domain", "phone", "linkedin", "email_sha256", "linkedin_sha256", "phone_sha256")
HASHED_KINDS = ("email_sha256", "linkedin_sha256", "phone_sha256")
ERASED = "erased"  # the reason of the hash left by erase_prospect
# When several suppressions match one prospect, the most specific one is reported.
_SPECIFICITY = ("email", "email_sha256", "linkedin", "linkedin_sha256", "phone", "phone_sha256", "domain")
_PRIORITY = {kind: rank for rank, kind in enumerate(_SPECIFICITY)}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 500  # prospects per query: ~8 bind values each stays far below both backends' limits


def hash_identifier(value: str) -> str:
    """The SHA-256 that stands for an email, a LinkedIn URL or a phone_identity once erased."""
    return hashlib.sha256(value.strip().lower().encode()).hexdigest()


def fold_name(text: str) -> str:
    """Accent- and case-insensitive: `Élodie` and `ELODIE` are one name."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def phone_identity(phone: str, first_name: str | None, last_name: str | None) -> str:
    """Who a phone number stands for: the number alone may be a switchboard shared by many."""
    names = (" ".join(fold_name(name or "").split()) for name in (first_name, last_name))
    return "|".join((phone, *names))


def normalise_value(kind: str, value: str) -> str:
    """The form prospects are stored in, so a suppression typed by hand still matches."""
    if kind not in KINDS:
        raise ValueError(f"unknown suppression kind {kind!r}: use one of {', '.join(KINDS)}")
    value = (value or "").strip()
    if kind == "email":
        value = value.removeprefix("mailto:").lower()
    elif kind == "domain":
        value = value.rpartition("@")[2].strip().rstrip(".").lower()
    elif kind == "phone":
        try:
            value = phonenumbers.format_number(phonenumbers.parse(value, None), phonenumbers.PhoneNumberFormat.E164)
        except phonenumbers.NumberParseException:
            pass  # not international: kept as given, it can only match what was stored so
    elif kind == "linkedin":
        from relance.prospects import normalise_linkedin_url  # prospects imports this module

        try:
            value = normalise_linkedin_url(value)
        except ValueError:
            pass
    else:
        value = value.lower()
        if not _HEX64.fullmatch(value):
            raise ValueError(f"a {kind} suppression takes a SHA-256 hex digest, got {value[:20]!r}")
    if not value:
        raise ValueError(f"empty {kind} suppression")
    return value


def among(conn: Connection, column: Any, values: Iterable[str]) -> ColumnElement[bool]:
    """`column IN values`, as a single array parameter on PostgreSQL.

    psycopg prepares a statement it runs five times, and PostgreSQL's generic plan for
    `IN ($1, ..., $1000)` may scan the table comparing each row with every value: seconds per
    batch at 100k rows. `= ANY($1)` keeps its index scan. SQLite plans IN lists well.
    """
    values = list(values)
    if conn.dialect.name == "postgresql":
        return column == any_(literal(values, ARRAY(column.type)))
    return column.in_(values)


def _insert_ignore(conn: Connection) -> Any:
    """INSERT that leaves an existing (kind, value) alone: the first reason recorded stays."""
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        return None
    return dialect_insert(suppressions).on_conflict_do_nothing(index_elements=["kind", "value"])


def suppress(
    conn: Connection,
    kind: str,
    value: str,
    reason: str,
    source: str | None = None,
    now: datetime | None = None,
) -> bool:
    """Record a suppression; True if it is new. Idempotent, so webhooks may repeat freely."""
    return suppress_many(conn, [(kind, value, reason, source)], now=now) == 1


def suppress_many(
    conn: Connection,
    items: Iterable[tuple[str, str, str, str | None]],
    *,
    now: datetime | None = None,
) -> int:
    """Record (kind, value, reason, source) tuples in one statement; returns how many were new."""
    now = now or utcnow()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, value, reason, source in items:
        value = normalise_value(kind, value)
        rows.setdefault(
            (kind, value),
            {"kind": kind, "value": value, "reason": reason[:200], "source": source and source[:300], "created_at": now},
        )
    if not rows:
        return 0
    stmt = _insert_ignore(conn)
    if stmt is not None:
        # RETURNING lists only the rows inserted; executemany rowcounts differ between drivers.
        return len(conn.execute(stmt.returning(suppressions.c.id), list(rows.values())).all())
    added = 0
    for row in rows.values():  # another backend: one savepoint per row
        try:
            with conn.begin_nested():
                conn.execute(insert(suppressions), row)
            added += 1
        except IntegrityError:
            pass
    return added


# Mailbox providers shared by millions: "stop contacting my whole company" never means these.
WEBMAIL_DOMAINS = frozenset({
    "gmail.com", "googlemail.com", "yahoo.com", "yahoo.fr", "hotmail.com", "hotmail.fr", "outlook.com", "outlook.fr",
    "live.com", "live.fr", "msn.com", "icloud.com", "me.com", "mac.com", "aol.com", "gmx.com", "gmx.fr", "gmx.de",
    "web.de", "orange.fr", "wanadoo.fr", "free.fr", "sfr.fr", "laposte.net", "bbox.fr", "proton.me", "protonmail.com",
    "yandex.com", "yandex.ru", "mail.ru", "zoho.com", "tutanota.com",
})


def company_domain(email: str | None) -> str | None:
    """The domain a whole-company opt-out would suppress; None for a webmail address."""
    domain = (email or "").rpartition("@")[2].strip().rstrip(".").lower()
    return domain if domain and domain not in WEBMAIL_DOMAINS else None


def _parent_domains(domain: str) -> list[str]:
    """sales.acme.fr -> [sales.acme.fr, acme.fr]: suppressing a domain covers its subdomains."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)] or [domain]


def _identifiers(prospect: Mapping[str, Any], kinds: frozenset[str]) -> list[tuple[str, str]]:
    """The (kind, value) pairs a prospect could be suppressed under, for the kinds in use."""
    keys: list[tuple[str, str]] = []
    email = (prospect.get("email") or "").strip().lower()
    if email:
        if "email" in kinds:
            keys.append(("email", email))
        if "email_sha256" in kinds:
            keys.append(("email_sha256", hash_identifier(email)))
        if "domain" in kinds:
            keys += [("domain", d) for d in _parent_domains(email.rpartition("@")[2])]
    linkedin = (prospect.get("linkedin_url") or prospect.get("linkedin") or "").strip()
    if linkedin:
        if "linkedin" in kinds:
            keys.append(("linkedin", linkedin))
        if "linkedin_sha256" in kinds:
            keys.append(("linkedin_sha256", hash_identifier(linkedin)))
    phone = (prospect.get("phone") or "").strip()
    if phone:
        if "phone" in kinds:
            keys.append(("phone", phone))
        if "phone_sha256" in kinds:
            identity = phone_identity(phone, prospect.get("first_name"), prospect.get("last_name"))
            keys.append(("phone_sha256", hash_identifier(identity)))
    return keys


def kinds_in_use(conn: Connection) -> frozenset[str]:
    """The suppression kinds with at least one row: one index probe each. Hashing and name
    folding for a kind nobody was suppressed under would cost the send path for nothing."""
    probes = [select(literal(kind)).where(suppressions.c.kind == kind).limit(1) for kind in KINDS]
    return frozenset(conn.scalars(union_all(*(p.subquery().select() for p in probes))))


def suppressed_ids(conn: Connection, prospects: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """{prospect id: why} for the suppressed ones among a batch, one query per 500 prospects.

    Accepts mappings or SQLAlchemy rows with `id`, `email`, `phone`, `linkedin_url` (and the
    names, for the `phone_sha256` an erasure leaves). The reason reads like
    "unsubscribed (email)": the stored reason and the kind that matched.
    """
    found: dict[int, tuple[int, str]] = {}
    kinds = kinds_in_use(conn) if prospects else frozenset()
    if not kinds:
        return {}
    for start in range(0, len(prospects), _CHUNK):
        wanted: dict[tuple[str, str], list[int]] = {}
        for p in prospects[start : start + _CHUNK]:
            m = getattr(p, "_mapping", p)
            for key in _identifiers(m, kinds):
                wanted.setdefault(key, []).append(m["id"])
        if not wanted:
            continue
        by_kind: dict[str, list[str]] = {}
        for kind, value in wanted:
            by_kind.setdefault(kind, []).append(value)
        clause = or_(*(and_(suppressions.c.kind == k, among(conn, suppressions.c.value, v)) for k, v in by_kind.items()))
        stmt = select(suppressions.c.kind, suppressions.c.value, suppressions.c.reason).where(clause)
        for kind, value, reason in conn.execute(stmt):
            rank = _PRIORITY.get(kind, len(_PRIORITY))
            for pid in wanted.get((kind, value), ()):
                if pid not in found or rank < found[pid][0]:
                    found[pid] = (rank, f"{reason} ({kind})")
    return {pid: why for pid, (_, why) in found.items()}


def is_suppressed(conn: Connection, prospect: Mapping[str, Any]) -> str | None:
    """Why this one prospect must not be contacted, or None; for single checks off the hot path."""
    m = dict(getattr(prospect, "_mapping", prospect))
    m["id"] = m.get("id", 0)
    return suppressed_ids(conn, [m]).get(m["id"])


def list_suppressions(conn: Connection, limit: int = 100, *, kind: str | None = None) -> list[dict[str, Any]]:
    """Newest first, for `relance suppressions` and audits."""
    stmt = select(suppressions).order_by(suppressions.c.id.desc()).limit(limit)
    if kind is not None:
        stmt = stmt.where(suppressions.c.kind == kind)
    return [dict(row._mapping) for row in conn.execute(stmt)]

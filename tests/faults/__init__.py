"""Fault injection: dispatchers killed mid-batch and providers that fail.

The helpers here build a workspace where hundreds of enrollments are due at once, so a run
has many batches to interrupt, and read back what the store and the sandbox outbox hold.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from datetime import datetime
from pathlib import Path

from sqlalchemy import insert, select

from relance.enrollment import enroll
from relance.store import enrollments, prospects, touches
from relance.workspace import Workspace
from tests.conftest import at, write_workspace

ENROLLED_AT = at("2027-03-15T07:00:00")  # Monday 08:00 in Paris: the intro is due 09:00-09:10
START = at("2027-03-15T08:30:00")  # 09:30 in Paris: every intro is due, the window is open
LEASE_SECONDS = 10  # the smallest lease config.yaml accepts: restarts stay inside the morning window


def fault_workspace(
    root: Path,
    database: str,
    *,
    email: str = "sandbox",
    email_settings: str = "",
    batch: int = 25,
    max_attempts: int = 5,
) -> Path:
    """write_workspace's multichannel cadence, a short lease, and the email connector and
    sandbox fault settings under test (`email_settings` is YAML flow text, e.g. `fail_rate: 0.3`)."""
    write_workspace(root, database, batch=batch, daily=100_000)
    config = root / "config.yaml"
    text = config.read_text()
    extra = f"{email_settings}, " if email_settings else ""
    text = text.replace("email: {use: sandbox, settings: {outbox: outbox,", f"email: {{use: {email}, settings: {{outbox: outbox, {extra}", 1)
    text = text.replace(f"dispatch: {{batch_size: {batch}}}", f"dispatch: {{batch_size: {batch}, lease_seconds: {LEASE_SECONDS}, max_attempts: {max_attempts}}}", 1)
    assert f"use: {email}" in text and "lease_seconds" in text, "write_workspace's config.yaml changed shape"
    config.write_text(text)
    return root


def enroll_many(ws: Workspace, count: int) -> list[int]:
    """`count` prospects enrolled in the multichannel cadence; returns the enrollment ids."""
    defaults = {"timezone": "Europe/Paris", "country": "FR", "attributes": {}, "created_at": ENROLLED_AT, "updated_at": ENROLLED_AT}
    rows = [
        {
            **defaults,
            "email": f"p{i}@client{i}.example",
            "first_name": f"Prénom{i}",
            "last_name": f"Nom{i}",
            "company": f"Client {i}",
            "phone": f"+3361{i:07d}",
            "linkedin_url": f"https://www.linkedin.com/in/p{i}",
        }
        for i in range(count)
    ]
    with ws.store.begin() as conn:
        ids = list(conn.execute(insert(prospects).returning(prospects.c.id, sort_by_parameter_order=True), rows).scalars())
    report = enroll(ws, ws.sequence("outbound"), ids, ENROLLED_AT)
    assert report.enrolled == count
    with ws.store.connect() as conn:
        return sorted(conn.scalars(select(enrollments.c.id)))


def touch_rows(ws: Workspace, *where) -> list:
    with ws.store.connect() as conn:
        return conn.execute(select(touches).where(*where).order_by(touches.c.id)).all()


def enrollment_rows(ws: Workspace) -> dict[int, object]:
    with ws.store.connect() as conn:
        return {r.id: r for r in conn.execute(select(enrollments))}


def eml_per_key(ws: Workspace) -> Counter[str]:
    """How many .eml files the outbox holds for each touch, read from the X-Relance-Touch header
    (a plain connector names a resend `<key>~2.eml`; a file cut short by a kill counts too)."""
    counts: Counter[str] = Counter()
    folder = ws.root / "outbox" / "email"
    for path in folder.glob("*.eml") if folder.exists() else ():
        key = None
        for line in path.read_bytes().split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"x-relance-touch:"):
                key = line.split(b":", 1)[1].strip().decode()
        counts[key or f"unreadable:{path.name}"] += 1
    return counts


def sandbox_table(ws: Workspace, table: str) -> dict[str, object]:
    """The sandbox provider's own memory (`accepted` keys, fault `attempts` per key)."""
    path = ws.root / "outbox" / "sandbox.db"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as conn:
        value = "provider_message_id" if table == "accepted" else "n"
        return dict(conn.execute(f"SELECT key, {value} FROM {table}"))


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")

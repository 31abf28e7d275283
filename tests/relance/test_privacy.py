"""Erasure on request and expiry after the retention period, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, insert, select

from relance.privacy import erase_prospect, expire_idle_prospects
from relance.prospects import find_prospects, import_csv
from relance.reports import build_report
from relance.store import Store, enrollments, events, prospects, touches
from relance.suppression import hash_identifier, list_suppressions, phone_identity, suppress, suppressed_ids

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
DAYS = 1095


def write(tmp_path: Path, content: str, name: str = "prospects.csv") -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


def enrollment(conn, prospect_id: int, state: str, at: datetime, sequence: str = "cfo") -> int:
    return conn.execute(
        insert(enrollments).values(
            prospect_id=prospect_id, sequence=sequence, state=state, next_step_id="intro" if state == "active" else None,
            next_due_at=at if state == "active" else None, enrolled_at=at, updated_at=at,
        ).returning(enrollments.c.id)
    ).scalar_one()  # fmt: skip


def sent_touch(conn, enrollment_id: int, prospect_id: int, key: str, recipient: str, at: datetime, error: str | None = None) -> int:
    return conn.execute(
        insert(touches).values(
            enrollment_id=enrollment_id, prospect_id=prospect_id, sequence="cfo", step_id="intro", channel="email",
            action="send", idempotency_key=key, status="failed" if error else "sent", spec_version="1",
            recipient=recipient, subject="Bonjour", error=error, created_at=at, sender="marie@acme.example",
        ).returning(touches.c.id)
    ).scalar_one()  # fmt: skip


def event(conn, kind: str, at: datetime, prospect_id: int, enrollment_id: int | None, touch_id: int | None, *, detail=None, payload=None) -> None:
    conn.execute(
        insert(events).values(
            occurred_at=at, recorded_at=at, kind=kind, channel="email", detail=detail, prospect_id=prospect_id,
            enrollment_id=enrollment_id, touch_id=touch_id, sequence="cfo", step_id="intro", sender="marie@acme.example",
            payload=payload or {}, dedupe_key=f"{kind}:{prospect_id}:{touch_id}:{at.isoformat()}",
        )
    )  # fmt: skip


def row_of(conn, prospect_id: int) -> dict:
    return dict(conn.execute(select(prospects).where(prospects.c.id == prospect_id)).mappings().one())


def test_erased_prospect_is_blanked_everywhere_and_not_recreated_by_reimport(store: Store, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "email,first_name,last_name,title,phone,linkedin,company,Secteur\n"
        "jean@acme.fr,Jean,Dupont,DAF,0612345678,https://www.linkedin.com/in/jean-dupont,Acme,SaaS\n"
        "paul@acme.fr,Paul,Martin,CFO,,,Acme,SaaS\n",
    )
    import_csv(store, path, now=NOW)
    with store.begin() as conn:
        (jean_id,) = find_prospects(conn, emails=["JEAN@acme.fr"])
        (paul_id,) = find_prospects(conn, emails=["paul@acme.fr"])
        enrollment_id = enrollment(conn, jean_id, "active", NOW)
        touch_id = sent_touch(conn, enrollment_id, jean_id, "k1", "jean@acme.fr", NOW, error="TerminalError: 552 <JEAN@acme.fr> mailbox full")
        event(conn, "replied", NOW, jean_id, enrollment_id, touch_id, payload={"from": "jean@acme.fr", "subject": "Re: Bonjour"})
        event(conn, "bounced", NOW, jean_id, enrollment_id, touch_id, detail="soft", payload={"diagnostic": "jean@acme.fr: over quota"})
        event(conn, "failed", NOW, jean_id, enrollment_id, touch_id, detail="TerminalError: 552 <jean@acme.fr> mailbox full")
        paul_enrollment = enrollment(conn, paul_id, "active", NOW)
        event(conn, "replied", NOW, paul_id, paul_enrollment, None, payload={"from": "paul@acme.fr"})
        suppress(conn, "email", "jean@acme.fr", "unsubscribed", source="web", now=NOW)
        before = build_report(conn, by="step")
    later = NOW + timedelta(days=2)
    with store.begin() as conn:
        assert erase_prospect(conn, jean_id, later) is True
        assert erase_prospect(conn, jean_id, later) is False  # idempotent
    with store.connect() as conn:
        jean = row_of(conn, jean_id)
        for name in ("email", "first_name", "last_name", "title", "phone", "linkedin_url"):
            assert jean[name] is None, name
        assert jean["attributes"] == {} and jean["erased_at"] == later and jean["company"] == "Acme"
        states = dict(conn.execute(select(enrollments.c.prospect_id, enrollments.c.state)).all())
        assert states == {jean_id: "exited", paul_id: "active"}
        assert conn.execute(select(touches.c.recipient, touches.c.subject, touches.c.error)).one() == (None, None, "TerminalError: 552 <(erased)> mailbox full")
        theirs = conn.execute(select(events.c.kind, events.c.detail, events.c.payload).where(events.c.prospect_id == jean_id).order_by(events.c.id)).all()
        assert [tuple(e) for e in theirs] == [
            ("replied", None, {}),
            ("bounced", "soft", {}),
            ("failed", "TerminalError: 552 <(erased)> mailbox full", {}),
        ]
        assert conn.scalar(select(events.c.payload).where(events.c.prospect_id == paul_id)) == {"from": "paul@acme.fr"}
        kept = {(s["kind"], s["value"], s["reason"]) for s in list_suppressions(conn)}
        assert kept == {  # the plain opt-out is gone: its hash, now marked erased, stands for it
            ("email_sha256", hash_identifier("jean@acme.fr"), "erased"),
            ("linkedin_sha256", hash_identifier("https://www.linkedin.com/in/jean-dupont"), "erased"),
            ("phone_sha256", hash_identifier(phone_identity("+33612345678", "Jean", "Dupont")), "erased"),
        }
        assert build_report(conn, by="step").rows == before.rows  # the event log still counts them
        assert find_prospects(conn, where={"company": "Acme"}) == [paul_id]

    for content in (
        "email,first_name\nJean@Acme.fr,Jean\n",
        "linkedin,first_name\nhttps://fr.linkedin.com/in/Jean-Dupont/,Jean\n",
        "Téléphone;Prénom;Nom\n06 12 34 56 78;JEAN;Dupont\n",  # a call list: number and name
    ):
        report = import_csv(store, write(tmp_path, content, name="again.csv"), now=later)
        assert [(r.row_number, r.reason) for r in report.rejected] == [(2, "erased on request")]
        assert report.imported == report.updated == 0
    report = import_csv(store, write(tmp_path, "Téléphone;Prénom;Nom\n06 12 34 56 78;Marie;Curie\n"), now=later)
    assert report.imported == 1  # the same number, someone else: switchboards are shared
    with store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(prospects)) == 3
        assert conn.scalar(select(func.count()).select_from(prospects).where(prospects.c.erased_at.isnot(None))) == 1


def test_retention_blanks_only_prospects_idle_for_the_whole_period(store: Store, tmp_path: Path) -> None:
    people = ["idle", "done", "active", "paused", "replied", "reimported", "optout"]
    import_csv(store, write(tmp_path, "email,first_name,last_name\n" + "".join(f"{p}@acme.fr,{p.title()},X\n" for p in people)), now=NOW)
    now = NOW + timedelta(days=DAYS + 30)
    recent = now - timedelta(days=10)
    with store.begin() as conn:
        ids = {p: find_prospects(conn, emails=[f"{p}@acme.fr"])[0] for p in people}
        done = enrollment(conn, ids["done"], "completed", NOW)
        event(conn, "sent", NOW, ids["done"], done, sent_touch(conn, done, ids["done"], "d1", "done@acme.fr", NOW), payload={"to": "done@acme.fr"})
        enrollment(conn, ids["active"], "active", NOW)
        enrollment(conn, ids["paused"], "paused", NOW)
        replied = enrollment(conn, ids["replied"], "exited", NOW)
        event(conn, "replied", recent, ids["replied"], replied, None)  # they wrote back lately: still a live contact
        suppress(conn, "email", "optout@acme.fr", "unsubscribed", source="web", now=NOW)
        before = build_report(conn, by="channel")
    import_csv(store, write(tmp_path, "email,first_name,title\nreimported@acme.fr,Reimported,CFO\n", name="update.csv"), now=recent)

    preview = expire_idle_prospects(store, now, DAYS, dry_run=True, batch=2)
    assert (preview.expired, preview.cutoff) == (3, now - timedelta(days=DAYS))
    with store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(prospects).where(prospects.c.erased_at.isnot(None))) == 0

    assert expire_idle_prospects(store, now, DAYS, batch=2).expired == 3  # two batches
    assert expire_idle_prospects(store, now, DAYS, batch=2).expired == 0  # nothing twice
    with store.connect() as conn:
        blanked = {p for p, pid in ids.items() if row_of(conn, pid)["email"] is None}
        assert blanked == {"idle", "done", "optout"}
        assert all(row_of(conn, ids[p])["erased_at"] == now and row_of(conn, ids[p])["first_name"] is None for p in blanked)
        assert conn.scalar(select(touches.c.recipient).where(touches.c.idempotency_key == "d1")) is None
        assert conn.scalar(select(events.c.payload).where(events.c.prospect_id == ids["done"])) == {}
        assert build_report(conn, by="channel").rows == before.rows
        # The opt-out stays in force, as a hash with its reason: the address is no longer stored.
        assert [(s["kind"], s["value"], s["reason"]) for s in list_suppressions(conn)] == [
            ("email_sha256", hash_identifier("optout@acme.fr"), "unsubscribed")
        ]

    # Unlike an erasure, an expiry refuses no re-import: they come back as someone new, and
    # whoever opted out stays out of reach.
    report = import_csv(store, write(tmp_path, "email,first_name\nidle@acme.fr,Idle\noptout@acme.fr,Opt\n", name="back.csv"), now=now)
    assert report.imported == 2 and not report.rejected
    with store.connect() as conn:
        back = conn.execute(select(prospects).where(prospects.c.email.in_(["idle@acme.fr", "optout@acme.fr"])).order_by(prospects.c.email)).all()
        assert [r.id not in ids.values() for r in back] == [True, True]
        assert suppressed_ids(conn, back) == {back[1].id: "unsubscribed (email_sha256)"}


"""Suppressions: normalised, permanent, and checked for a whole batch in one query."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, insert, select

from relance import suppression
from relance.store import Store, prospects
from relance.suppression import (
    hash_identifier,
    is_suppressed,
    list_suppressions,
    phone_identity,
    suppress,
    suppress_many,
    suppressed_ids,
)

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def count_selects(store: Store):
    """A list that fills with the SELECTs on suppressions run while the listener is on."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if statement.lstrip().upper().startswith("SELECT") and "suppressions" in statement:
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    return seen, lambda: event.remove(store.engine, "before_cursor_execute", record)


def test_suppress_normalises_and_is_idempotent(store: Store) -> None:
    with store.begin() as conn:
        assert suppress(conn, "email", " Jean@ACME.fr ", "unsubscribed", source="brevo", now=NOW) is True
        assert suppress(conn, "email", "jean@acme.fr", "bounced", now=NOW + timedelta(hours=1)) is False
        assert suppress(conn, "domain", "@Globex.COM", "complained", now=NOW)
        assert suppress(conn, "phone", "+33 6 12 34 56 78", "wrong number", now=NOW)
        assert suppress(conn, "linkedin", "fr.linkedin.com/in/Jean-Dupont/", "asked", now=NOW)
        rows = list_suppressions(conn)
    assert [(r["kind"], r["value"], r["reason"]) for r in rows] == [
        ("linkedin", "https://www.linkedin.com/in/jean-dupont", "asked"),
        ("phone", "+33612345678", "wrong number"),
        ("domain", "globex.com", "complained"),
        ("email", "jean@acme.fr", "unsubscribed"),  # the first reason stays
    ]
    assert rows[-1]["source"] == "brevo" and rows[-1]["created_at"] == NOW


def test_suppress_many_counts_new_rows(store: Store) -> None:
    with store.begin() as conn:
        suppress(conn, "email", "a@acme.fr", "bounced", now=NOW)
        items = [
            ("email", "a@acme.fr", "bounced", None),
            ("email", "B@acme.fr", "bounced", None),
            ("email", "b@acme.fr", "bounced", None),
            ("domain", "acme.fr", "asked", "ops"),
        ]
        assert suppress_many(conn, items, now=NOW) == 2
        assert len(list_suppressions(conn, limit=10)) == 3
        assert len(list_suppressions(conn, limit=2)) == 2
        assert [r["value"] for r in list_suppressions(conn, kind="domain")] == ["acme.fr"]


def test_bad_kinds_and_values(store: Store) -> None:
    with store.begin() as conn:
        with pytest.raises(ValueError, match="unknown suppression kind"):
            suppress(conn, "fax", "123", "x", now=NOW)
        with pytest.raises(ValueError, match="SHA-256"):
            suppress(conn, "email_sha256", "jean@acme.fr", "x", now=NOW)
        with pytest.raises(ValueError, match="empty"):
            suppress(conn, "email", "  ", "x", now=NOW)


def test_no_unsuppress() -> None:
    assert not hasattr(suppression, "unsuppress")


def test_suppressed_ids_checks_a_batch_in_two_queries(store: Store) -> None:
    """One probe for the kinds in use, one lookup for the whole batch."""
    batch = [
        {"id": 1, "email": "Jean@acme.fr", "phone": None, "linkedin_url": None},  # by email
        {"id": 2, "email": "paul@sales.globex.com", "phone": None, "linkedin_url": None},  # parent domain
        {"id": 3, "email": "x@initech.fr", "phone": "+33612345678", "linkedin_url": None},  # phone
        {"id": 4, "email": None, "phone": None, "linkedin_url": "https://www.linkedin.com/in/marie"},
        {"id": 5, "email": "erased@acme.fr", "phone": None, "linkedin_url": None},  # only its hash is kept
        {"id": 6, "email": "clean@initech.fr", "phone": "+33698765432", "linkedin_url": None},
        {"id": 7, "email": None, "phone": None, "linkedin_url": None},
        {"id": 8, "email": "jean@acme.fr", "phone": "+33612345678", "linkedin_url": None},  # email wins
        {"id": 9, "phone": "+33140000000", "first_name": "Élodie", "last_name": "Martin"},  # erased caller
        {"id": 10, "phone": "+33140000000", "first_name": "Paul", "last_name": "Martin"},  # same switchboard
    ]
    with store.begin() as conn:
        suppress(conn, "email", "jean@acme.fr", "unsubscribed", now=NOW)
        suppress(conn, "domain", "globex.com", "complained", now=NOW)
        suppress(conn, "phone", "+33 6 12 34 56 78", "wrong number", now=NOW)
        suppress(conn, "linkedin", "linkedin.com/in/Marie/", "asked", now=NOW)
        suppress(conn, "email_sha256", hash_identifier("ERASED@acme.fr"), "erased", now=NOW)
        suppress(conn, "domain", "initech.com", "competitor", now=NOW)  # not initech.fr
        identity = phone_identity("+33140000000", "ELODIE", "martin")
        suppress(conn, "phone_sha256", hash_identifier(identity), "erased", now=NOW)
    seen, stop = count_selects(store)
    try:
        with store.connect() as conn:
            found = suppressed_ids(conn, batch)
    finally:
        stop()
    assert len(seen) == 2
    assert found == {
        1: "unsubscribed (email)",
        2: "complained (domain)",
        3: "wrong number (phone)",
        4: "asked (linkedin)",
        5: "erased (email_sha256)",
        8: "unsubscribed (email)",
        9: "erased (phone_sha256)",
    }


def test_large_batches_take_a_few_queries_and_accept_rows(store: Store) -> None:
    with store.begin() as conn:
        conn.execute(
            insert(prospects),
            [
                {"email": f"p{i}@acme.fr", "first_name": "P", "attributes": {}, "created_at": NOW, "updated_at": NOW}
                for i in range(1200)
            ],
        )
        suppress(conn, "email", "p7@acme.fr", "bounced", now=NOW)
        suppress(conn, "email", "p1100@acme.fr", "unsubscribed", now=NOW)
    seen, stop = count_selects(store)
    try:
        with store.connect() as conn:
            rows = conn.execute(select(prospects).order_by(prospects.c.id)).all()
            found = suppressed_ids(conn, rows)
            by_email = {r.email: r.id for r in rows}
            assert is_suppressed(conn, rows[0]) is None
            assert is_suppressed(conn, {"email": "P7@acme.fr"}) == "bounced (email)"
    finally:
        stop()
    assert found == {by_email["p7@acme.fr"]: "bounced (email)", by_email["p1100@acme.fr"]: "unsubscribed (email)"}
    assert len(seen) == 1 + 3 + 2 * 2  # kinds probe, 1200 rows in chunks of 500, two single checks (probe + lookup)
    with store.connect() as conn:
        assert suppressed_ids(conn, []) == {}


def test_an_empty_suppression_list_costs_one_probe(store: Store) -> None:
    seen, stop = count_selects(store)
    try:
        with store.connect() as conn:
            found = suppressed_ids(conn, [{"id": 1, "email": "jean@acme.fr", "phone": "+33612345678", "linkedin_url": None}])
    finally:
        stop()
    assert found == {} and len(seen) == 1


# ---------------------------------------------------------------------------------------------
# Issue 4 item 7, end to end: an opt-out, a hard bounce or a complaint suppresses the address at
# once (the whole domain when asked), ends every active enrollment of the prospect before its
# next touch, and no re-import undoes it. Each test first enrolls a few bystanders so that
# enrollment ids and prospect ids never coincide: a check keyed by the wrong one must fail.

E2E_SENT_AT = datetime(2027, 3, 15, 9, 30, tzinfo=UTC)  # Monday 10:30 in Paris, inside the window


def _e2e(workspace_dir):
    from relance.workspace import Workspace

    return Workspace.load(workspace_dir)


def _bystanders(ws, n: int = 3) -> list[int]:
    """Prospects in two sequences each, so later enrollment ids run ahead of prospect ids."""
    from relance.enrollment import enroll
    from tests.relance.test_engine import MONDAY, add_prospects, person

    ids = add_prospects(ws, *(person(900 + i) for i in range(n)))
    enroll(ws, ws.sequence("outbound"), ids, MONDAY)
    enroll(ws, ws.sequence("nurture"), ids, MONDAY)
    return ids


def _respond(ws, touch, kind: str, when: datetime, detail: str | None = None):
    """A response through the real ingest path (rules applied in the same transaction)."""
    from relance.channels import InboundEvent
    from relance.events import Channel, EventKind
    from relance.ingest import ingest

    event = InboundEvent(
        kind=EventKind(kind), channel=Channel.email, occurred_at=when, dedupe_key=f"test:{kind}:{touch.id}",
        touch_id=touch.id, detail=detail,
    )
    return ingest(ws, [event], when)


def _states(ws, prospect_id: int) -> dict[str, tuple[str, str | None]]:
    from relance.store import enrollments

    with ws.store.connect() as conn:
        rows = conn.execute(
            select(enrollments.c.sequence, enrollments.c.state, enrollments.c.reason).where(enrollments.c.prospect_id == prospect_id)
        ).all()
    return {r.sequence: (r.state, r.reason) for r in rows}


def _suppressions(ws) -> set[tuple[str, str, str]]:
    with ws.store.connect() as conn:
        return {(s["kind"], s["value"], s["reason"]) for s in list_suppressions(conn)}


def _sent_after(ws, days: int, among: set[int]) -> set[int]:
    """Run dispatch once a day for `days` days; the prospects of `among` that got a touch."""
    from relance.dispatch import Dispatcher
    from tests.relance.test_engine import touch_rows

    before = {t.id for t in touch_rows(ws)}
    dispatcher = Dispatcher(ws)
    for day in range(1, days + 1):
        dispatcher.run(E2E_SENT_AT + timedelta(days=day))
    return {t.prospect_id for t in touch_rows(ws) if t.id not in before and t.status not in ("skipped", "failed")} & among


def test_hard_bounce_and_complaint_suppress_at_once_and_end_every_cadence(workspace_dir):
    from relance.dispatch import Dispatcher
    from relance.enrollment import enroll
    from tests.relance.test_engine import MONDAY, add_prospects, person, touch_rows

    ws = _e2e(workspace_dir)
    try:
        _bystanders(ws)
        bounced, complained, other = add_prospects(ws, person(1), person(2), person(3))
        enroll(ws, ws.sequence("outbound"), [bounced, complained, other], MONDAY)
        enroll(ws, ws.sequence("nurture"), [bounced, complained, other], MONDAY)  # non-exclusive, in parallel
        Dispatcher(ws).run(E2E_SENT_AT)
        intro = {t.prospect_id: t for t in touch_rows(ws, step_id="intro")}
        later = E2E_SENT_AT + timedelta(hours=1)

        assert _respond(ws, intro[bounced], "bounced", later, "hard").suppressed == 1
        assert _respond(ws, intro[complained], "complained", later).suppressed == 3  # email, phone, LinkedIn

        # At once: recorded in the same transaction as the event, before any dispatch.
        assert _suppressions(ws) == {
            ("email", "p1@client1.example", "hard bounce"),
            ("email", "p2@client2.example", "complained"),
            ("phone", "+33612340002", "complained"),
            ("linkedin", "https://www.linkedin.com/in/p2", "complained"),
        }
        assert _states(ws, bounced)["outbound"] == ("exited", "bounced received")
        assert _states(ws, complained) == {"outbound": ("exited", "complained received"), "nurture": ("exited", "complained received")}

        # Before its next touch: the bounced address gets nothing more from any sequence (its
        # nurture email falls due on day 15), while the third prospect's cadences go on.
        assert _sent_after(ws, 20, {bounced, complained, other}) == {other}
        assert _states(ws, bounced)["nurture"][0] == "exited"
    finally:
        ws.close()


def test_a_soft_bounce_neither_suppresses_nor_ends_the_cadence(workspace_dir):
    from relance.dispatch import Dispatcher
    from relance.enrollment import enroll
    from tests.relance.test_engine import MONDAY, add_prospects, person, touch_rows

    ws = _e2e(workspace_dir)
    try:
        [full] = add_prospects(ws, person(1))
        enroll(ws, ws.sequence("outbound"), [full], MONDAY)
        Dispatcher(ws).run(E2E_SENT_AT)
        [intro] = touch_rows(ws, step_id="intro")
        summary = _respond(ws, intro, "bounced", E2E_SENT_AT + timedelta(hours=1), "soft")  # mailbox full
        assert (summary.recorded, summary.suppressed, summary.exited) == (1, 0, 0)
        assert _suppressions(ws) == set()
        assert _sent_after(ws, 3, {full}) == {full}  # the LinkedIn invitation and the call go on
        assert _states(ws, full)["outbound"][0] == "active"
    finally:
        ws.close()


def test_a_domain_suppressed_on_request_stops_every_colleague_before_the_next_touch(workspace_dir):
    from relance.dispatch import Dispatcher
    from relance.enrollment import enroll
    from tests.relance.test_engine import MONDAY, add_prospects, person, touch_rows

    ws = _e2e(workspace_dir)
    try:
        _bystanders(ws)
        ids = add_prospects(
            ws,
            person(1, email="jean@globex.example"),
            person(2, email="marie@fr.globex.example"),  # a subdomain of the suppressed domain
            person(3, email="paul@globex.example.org"),  # another domain that merely starts alike
            person(4, email="zoe@initech.example"),
        )
        enroll(ws, ws.sequence("outbound"), ids, MONDAY)
        Dispatcher(ws).run(E2E_SENT_AT)
        assert len([t for t in touch_rows(ws, step_id="intro") if t.prospect_id in ids]) == 4
        with ws.store.begin() as conn:  # "ne contactez plus personne chez nous"
            assert suppress(conn, "domain", "Jean@GLOBEX.example", "asked: whole company", source="reply", now=E2E_SENT_AT) is True
        assert _sent_after(ws, 5, set(ids)) == {ids[2], ids[3]}
        for pid in ids[:2]:
            state, reason = _states(ws, pid)["outbound"]
            assert state == "exited" and "asked: whole company (domain)" in (reason or ""), reason
        assert _suppressions(ws) == {("domain", "globex.example", "asked: whole company")}
    finally:
        ws.close()


def test_no_reimport_undoes_an_opt_out_a_bounce_or_a_domain(workspace_dir, tmp_path):
    from relance.dispatch import Dispatcher
    from relance.enrollment import enroll
    from relance.prospects import import_csv
    from tests.relance.test_engine import MONDAY, touch_rows

    ws = _e2e(workspace_dir)
    try:
        _bystanders(ws)
        first = tmp_path / "first.csv"
        first.write_text(
            "email,first_name,last_name,company,phone\n"
            "jean@acme.example,Jean,Dupont,Acme,+33612345601\n"
            "lucie@acme.example,Lucie,Roy,Acme,+33612345602\n"
            "paul@globex.example,Paul,Henry,Globex,+33612345603\n"
            "zoe@initech.example,Zoé,Petit,Initech,+33612345604\n"
        )
        assert import_csv(ws.store, first, now=MONDAY).imported == 4
        with ws.store.connect() as conn:
            pid = {r.email: r.id for r in conn.execute(select(prospects.c.id, prospects.c.email).where(~prospects.c.email.like("p9%")))}
        enroll(ws, ws.sequence("outbound"), sorted(pid.values()), MONDAY)
        Dispatcher(ws).run(E2E_SENT_AT)
        intro = {t.prospect_id: t for t in touch_rows(ws, step_id="intro")}
        later = E2E_SENT_AT + timedelta(hours=1)
        _respond(ws, intro[pid["jean@acme.example"]], "unsubscribed", later)
        _respond(ws, intro[pid["lucie@acme.example"]], "bounced", later, "hard")
        with ws.store.begin() as conn:
            suppress(conn, "domain", "globex.example", "asked: whole company", now=later)
        kept = _suppressions(ws)

        # The same people again, from another CRM export: French headers, other case, new phones and titles.
        again = tmp_path / "again.csv"
        again.write_text(
            "E-mail,Prénom,Nom,Société,Téléphone,Fonction\n"
            "JEAN@Acme.example,Jean,Dupont,Acme,+33699999901,DAF\n"
            "Lucie@ACME.example,Lucie,Roy,Acme,+33699999902,CFO\n"
            "paul@GLOBEX.example,Paul,Henry,Globex,+33699999903,DAF\n"
            "zoe@initech.example,Zoé,Petit,Initech,+33612345604,CFO\n"
        )
        report = import_csv(ws.store, again, now=later)
        assert report.updated == 4 and report.imported == 0
        assert _suppressions(ws) == kept  # nothing removed, nothing weakened
        with ws.store.connect() as conn:
            rows = [r for r in conn.execute(select(prospects)).all() if r.id in pid.values()]
            found = suppressed_ids(conn, rows)
        assert {r.email: found.get(r.id, "").split(" (")[0] for r in rows} == {
            "jean@acme.example": "unsubscribed",
            "lucie@acme.example": "hard bounce",
            "paul@globex.example": "asked: whole company",
            "zoe@initech.example": "",
        }
        # Enrolling them again is refused; only Zoé is ever contacted again.
        result = enroll(ws, ws.sequence("nurture"), sorted(pid.values()), later)
        assert result.enrolled == 1 and sum(result.skipped.values()) == 3, result.skipped
        assert _sent_after(ws, 20, set(pid.values())) == {pid["zoe@initech.example"]}
    finally:
        ws.close()

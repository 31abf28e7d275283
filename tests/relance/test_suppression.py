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


def test_suppressed_ids_checks_a_batch_in_one_query(store: Store) -> None:
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
    assert len(seen) == 1
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
    assert len(seen) == 3 + 2  # 1200 rows in chunks of 500, then the two single checks
    with store.connect() as conn:
        assert suppressed_ids(conn, []) == {}

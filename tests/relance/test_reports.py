"""Reports: every metric and rate against an event log of known counts, on both backends."""

from __future__ import annotations

import csv
import io
import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import event, insert

from relance.reports import build_report, deliverability_report
from relance.store import Store, events


JAN = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)  # sequence s1 happens in January
FEB = datetime(2026, 2, 10, 9, 0, tzinfo=UTC)  # sequence s2 in February
ALICE, BOB, CAROL = "alice@acme.example", "bob@acme.example", "carol@acme.example"


class Log:
    """Builds event rows the way the engine records them, with unique dedupe keys."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._n = itertools.count(1)

    def add(
        self,
        kind: str,
        channel: str | None,
        touch: int | None,
        *,
        seq: str | None = "s1",
        step: str | None = "intro",
        variant: str | None = None,
        sender: str | None = ALICE,
        at: datetime = JAN,
        detail: str | None = None,
        enrollment: int | None = None,
        times: int = 1,
    ) -> None:
        for _ in range(times):
            n = next(self._n)
            self.rows.append(
                {
                    "occurred_at": at + timedelta(seconds=n),
                    "recorded_at": at + timedelta(seconds=n),
                    "kind": kind,
                    "channel": channel,
                    "detail": detail,
                    "prospect_id": enrollment if enrollment is not None else touch,
                    "enrollment_id": enrollment if enrollment is not None else touch,
                    "touch_id": touch,
                    "sequence": seq,
                    "step_id": step,
                    "variant": variant,
                    "sender": sender,
                    "payload": {},
                    "dedupe_key": f"test:{n}",
                }
            )

    def save(self, store: Store) -> None:
        with store.begin() as conn:
            conn.execute(insert(events), self.rows)


def campaign() -> Log:
    """Two sequences with hand-countable outcomes (the expected values are in EXPECTED)."""
    log = Log()
    # s1 / intro: 10 emails, variant a from Alice (touches 1-6), variant b from Bob (7-10).
    for t in range(1, 11):
        variant, sender = ("a", ALICE) if t <= 6 else ("b", BOB)
        email = {"variant": variant, "sender": sender}
        log.add("queued", "email", t, **email)  # bookkeeping: never a metric
        log.add("sent", "email", t, **email)
        if t <= 8:
            log.add("delivered", "email", t, **email)
    a, b = {"variant": "a", "sender": ALICE}, {"variant": "b", "sender": BOB}
    log.add("bounced", "email", 9, detail="hard", **b)
    log.add("bounced", "email", 10, detail="soft", **b)
    log.add("bounced", "email", 10, detail="hard", **b)  # a soft bounce that turned hard: one bounce
    log.add("opened", "email", 1, times=3, **a)  # re-opens count once
    log.add("opened", "email", 2, times=2, **a)
    log.add("opened", "email", 3, **a)
    log.add("opened", "email", 7, **b)
    log.add("clicked", "email", 1, times=2, **a)
    log.add("clicked", "email", 7, **b)
    log.add("replied", "email", 2, **a)
    log.add("auto_replied", "email", 3, **a)
    log.add("complained", "email", 4, **a)
    log.add("unsubscribed", "email", 5, times=2, **a)  # one-click header and footer link
    log.add("meeting_booked", "email", 2, **a)
    log.add("failed", "email", 11, detail="terminal")  # never sent
    # s1 / visit, invite, message: LinkedIn from Alice.
    for t in (25, 26, 27):
        log.add("visited", "linkedin", t, step="visit")
    for t in (21, 22, 23, 24):
        log.add("invited", "linkedin", t, step="invite")
    log.add("accepted", "linkedin", 21, step="invite")
    log.add("accepted", "linkedin", 22, step="invite")
    # s1 / call-1: five calls placed, one failed.
    for t in range(31, 36):
        log.add("queued", "call", t, step="call-1")
        log.add("sent", "call", t, step="call-1")
    log.add("call_connected", "call", 31, step="call-1")
    log.add("call_connected", "call", 32, step="call-1")
    log.add("call_voicemail", "call", 33, step="call-1")
    log.add("call_no_answer", "call", 34, step="call-1")
    log.add("call_wrong_number", "call", 35, step="call-1")
    log.add("meeting_booked", "call", 31, step="call-1")
    log.add("failed", "call", 36, step="call-1", detail="terminal")
    log.add("task_done", "call", 31, step="call-1")  # not a metric
    for t in (28, 29):
        log.add("messaged", "linkedin", t, step="message")
    log.add("replied", "linkedin", 28, step="message")
    log.add("meeting_booked", "linkedin", 28, step="message")
    # s1: a meeting booked from a calendar link (no touch, no channel), two finished enrollments.
    log.add("meeting_booked", None, None, step=None, sender=None, enrollment=3)
    log.add("completed", None, None, step=None, sender=None, enrollment=1)
    log.add("completed", None, None, step=None, sender=None, enrollment=2)
    # s2 / intro in February, from Carol, no variants.
    s2 = {"seq": "s2", "sender": CAROL, "at": FEB}
    log.add("sent", "email", 41, **s2)
    log.add("sent", "email", 42, **s2)
    log.add("delivered", "email", 41, **s2)
    log.add("opened", "email", 41, times=4, **s2)
    return log


EXPECTED_COUNTS = {
    "email_sent": 12,
    "email_delivered": 9,
    "email_opened": 5,
    "email_clicked": 2,
    "email_replied": 1,
    "email_auto_replied": 1,
    "email_bounced": 2,
    "email_bounced_hard": 2,
    "email_bounced_soft": 1,
    "email_complained": 1,
    "email_unsubscribed": 1,
    "email_meetings": 1,
    "email_failed": 1,
    "linkedin_visited": 3,
    "linkedin_invited": 4,
    "linkedin_accepted": 2,
    "linkedin_messaged": 2,
    "linkedin_replied": 1,
    "linkedin_meetings": 1,
    "linkedin_failed": 0,
    "call_attempted": 5,
    "call_connected": 2,
    "call_voicemail": 1,
    "call_no_answer": 1,
    "call_wrong_number": 1,
    "call_meetings": 1,
    "call_failed": 1,
    "meetings": 4,
    "failed": 2,
    "completed": 2,
}
EXPECTED_RATES = {
    "email_delivery_rate": 9 / 12,
    "email_open_rate": 5 / 9,
    "email_click_rate": 2 / 9,
    "email_reply_rate": 1 / 12,
    "email_bounce_rate": 2 / 12,
    "email_complaint_rate": 1 / 9,
    "email_unsubscribe_rate": 1 / 9,
    "email_meeting_rate": 1 / 12,
    "linkedin_acceptance_rate": 2 / 4,
    "linkedin_reply_rate": 1 / 2,
    "linkedin_meeting_rate": 1 / 6,
    "call_connect_rate": 2 / 5,
    "call_meeting_rate": 1 / 5,
}


@pytest.fixture
def filled(store: Store) -> Store:
    campaign().save(store)
    return store


def report(store: Store, **kwargs: Any):
    with store.connect() as conn:
        return build_report(conn, **kwargs)


def render(tables: list) -> str:
    console = Console(record=True, width=200)
    for table in tables:
        console.print(table)
    return console.export_text()


def test_totals_count_every_metric_and_rate(filled: Store):
    r = report(filled)
    assert {k: r.totals[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
    assert {k: r.totals[k] for k in EXPECTED_RATES} == pytest.approx(EXPECTED_RATES)
    assert set(r.totals) == set(EXPECTED_COUNTS) | set(EXPECTED_RATES)


def test_by_channel_rows_split_the_totals(filled: Store):
    r = report(filled, by="channel")
    assert r.dimension == "channel" and r.keys == ("channel",)
    rows = {row["channel"]: row for row in r.rows}
    assert list(rows) == ["call", "email", "linkedin", None]
    assert rows["email"]["email_sent"] == 12 and rows["email"]["linkedin_invited"] == 0
    assert rows["email"]["email_open_rate"] == pytest.approx(5 / 9)
    assert rows["email"]["call_connect_rate"] is None  # nothing attempted on that row
    assert rows["call"]["call_attempted"] == 5 and rows["call"]["email_sent"] == 0
    assert rows["linkedin"]["linkedin_accepted"] == 2
    assert (rows[None]["meetings"], rows[None]["completed"], rows[None]["failed"]) == (1, 2, 0)
    for key in EXPECTED_COUNTS:
        assert sum(row[key] for row in r.rows) == r.totals[key]


def test_distinct_touches_not_events(store: Store):
    log = Log()
    log.add("sent", "email", 1)
    log.add("delivered", "email", 1)
    log.add("opened", "email", 1, times=5)
    log.add("clicked", "email", 1, times=3)
    log.add("replied", "email", 1, times=2)
    log.save(store)
    t = report(store).totals
    assert (t["email_opened"], t["email_clicked"], t["email_replied"]) == (1, 1, 1)
    assert t["email_open_rate"] == t["email_click_rate"] == t["email_reply_rate"] == 1.0


def test_by_step_keeps_cadence_order_within_each_sequence(filled: Store):
    r = report(filled, by="step")
    assert r.keys == ("sequence", "step")
    assert [(row["sequence"], row["step"]) for row in r.rows] == [
        ("s1", "intro"),
        ("s1", "visit"),
        ("s1", "invite"),
        ("s1", "call-1"),
        ("s1", "message"),
        ("s1", None),
        ("s2", "intro"),
    ]
    rows = {(row["sequence"], row["step"]): row for row in r.rows}
    intro = rows["s1", "intro"]
    assert (intro["email_sent"], intro["email_delivered"], intro["email_opened"], intro["email_failed"]) == (10, 8, 4, 1)
    assert intro["email_open_rate"] == pytest.approx(4 / 8)
    assert intro["email_bounce_rate"] == pytest.approx(2 / 10)
    assert rows["s1", "invite"]["linkedin_acceptance_rate"] == 0.5
    assert rows["s1", "invite"]["linkedin_reply_rate"] is None  # no message on that step
    assert rows["s1", "message"]["linkedin_reply_rate"] == 0.5
    call = rows["s1", "call-1"]
    assert (call["call_attempted"], call["call_connected"], call["call_meetings"], call["call_failed"]) == (5, 2, 1, 1)
    assert rows["s1", None]["meetings"] == 1 and rows["s1", None]["completed"] == 2
    assert rows["s2", "intro"]["email_opened"] == 1
    assert {k: r.totals[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS


def test_by_variant_compares_ab_variants_only(filled: Store):
    r = report(filled, by="variant")
    assert r.keys == ("sequence", "step", "variant")
    rows = {row["variant"]: row for row in r.rows}
    assert [(row["sequence"], row["step"], row["variant"]) for row in r.rows] == [("s1", "intro", "a"), ("s1", "intro", "b")]
    a, b = rows["a"], rows["b"]
    assert (a["email_sent"], a["email_delivered"], a["email_opened"], a["email_clicked"]) == (6, 6, 3, 1)
    assert (a["email_replied"], a["email_meetings"], a["email_bounced"]) == (1, 1, 0)
    assert (b["email_sent"], b["email_delivered"], b["email_opened"], b["email_clicked"]) == (4, 2, 1, 1)
    assert (b["email_bounced"], b["email_bounced_hard"], b["email_bounced_soft"]) == (2, 2, 1)
    assert a["email_open_rate"] == 0.5 and b["email_open_rate"] == 0.5
    assert a["email_reply_rate"] == pytest.approx(1 / 6) and b["email_reply_rate"] == 0.0
    assert b["email_bounce_rate"] == 0.5
    assert r.totals["email_sent"] == 10 and r.totals["email_failed"] == 0  # touch 11 has no variant


def test_by_sender_and_by_sequence(filled: Store):
    senders = {row["sender"]: row for row in report(filled, by="sender").rows}
    assert list(senders) == [ALICE, BOB, CAROL, None]
    assert senders[ALICE]["email_sent"] == 6 and senders[ALICE]["linkedin_invited"] == 4
    assert senders[ALICE]["call_attempted"] == 5 and senders[ALICE]["email_failed"] == 1
    assert senders[BOB]["email_sent"] == 4 and senders[BOB]["email_bounced_hard"] == 2
    assert senders[CAROL]["email_sent"] == 2 and senders[CAROL]["email_open_rate"] == 1.0
    assert senders[None]["completed"] == 2 and senders[None]["meetings"] == 1

    sequences = {row["sequence"]: row for row in report(filled, by="sequence").rows}
    assert list(sequences) == ["s1", "s2"]
    assert sequences["s1"]["email_sent"] == 10 and sequences["s1"]["meetings"] == 4
    assert sequences["s2"]["email_sent"] == 2 and sequences["s2"]["email_delivery_rate"] == 0.5


def test_sequence_filter(filled: Store):
    r = report(filled, by="step", sequence="s2")
    assert [(row["sequence"], row["step"]) for row in r.rows] == [("s2", "intro")]
    assert (r.totals["email_sent"], r.totals["email_opened"], r.totals["meetings"]) == (2, 1, 0)
    assert r.filters == {"sequence": "s2", "since": None, "until": None}
    assert report(filled, sequence="nope").rows == []


def test_since_is_inclusive_and_until_exclusive(filled: Store):
    feb_first_event = min(row["occurred_at"] for row in campaign().rows if row["sequence"] == "s2")  # Carol's first send
    february = report(filled, since=feb_first_event)
    assert (february.totals["email_sent"], february.totals["email_delivered"]) == (2, 1)
    assert february.totals["linkedin_invited"] == 0
    january = report(filled, until=feb_first_event)
    assert january.totals["email_sent"] == 10 and january.totals["completed"] == 2
    window = report(filled, since=JAN, until=JAN + timedelta(days=1), by="sequence")
    assert [row["sequence"] for row in window.rows] == ["s1"]
    assert report(filled, since=FEB + timedelta(days=1)).rows == []


def test_empty_report_divides_by_zero_into_none(store: Store):
    r = report(store)
    assert r.rows == []
    assert all(r.totals[k] == 0 for k in EXPECTED_COUNTS)
    assert all(r.totals[k] is None for k in EXPECTED_RATES)
    text_ = render(r.to_rich_tables())
    assert "–" in text_
    for title in ("Email", "LinkedIn", "Call"):
        assert title in text_


def test_unknown_dimension_is_refused(store: Store):
    with pytest.raises(ValueError, match="unknown report dimension 'week'"):
        report(store, by="week")


def test_report_is_one_aggregate_statement(filled: Store):
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        statements.append(statement)

    event.listen(filled.engine, "before_cursor_execute", record)
    try:
        with filled.connect() as conn:
            build_report(conn, by="step")
            deliverability_report(conn)
    finally:
        event.remove(filled.engine, "before_cursor_execute", record)
    selects = [s for s in statements if "FROM events" in s]
    assert len(selects) == 2
    assert all("GROUP BY" in s and "count(DISTINCT" in s for s in selects)


def test_json_round_trip(filled: Store):
    since = JAN - timedelta(days=1)
    r = report(filled, by="step", since=since)
    data = json.loads(r.to_json())
    assert data["dimension"] == "step" and data["keys"] == ["sequence", "step"]
    assert data["filters"] == {"sequence": None, "since": since.isoformat(), "until": None}
    assert data["rows"] == r.rows
    assert data["totals"] == r.totals
    assert data["totals"]["linkedin_failed"] == 0


def test_csv_round_trip(filled: Store):
    r = report(filled, by="step")
    parsed = list(csv.DictReader(io.StringIO(r.to_csv())))
    assert len(parsed) == len(r.rows) + 1
    header = list(parsed[0])
    assert header[:2] == ["sequence", "step"] and set(header[2:]) == set(r.totals)
    for row, line in zip(r.rows, parsed):
        assert line["sequence"] == row["sequence"] and line["step"] == (row["step"] or "")
        assert int(line["email_sent"]) == row["email_sent"]
        rate = row["email_open_rate"]
        assert line["email_open_rate"] == ("" if rate is None else str(rate))
        if rate is not None:
            assert float(line["email_open_rate"]) == pytest.approx(rate)
    total = parsed[-1]
    assert total["sequence"] == "TOTAL" and total["step"] == ""
    assert {k: int(total[k]) for k in EXPECTED_COUNTS} == EXPECTED_COUNTS


def test_rich_tables_one_per_channel(filled: Store):
    by_channel = report(filled, by="channel")
    tables = by_channel.to_rich_tables()
    assert [t.title for t in tables] == ["Email", "LinkedIn", "Call", "All channels"]
    out = render(tables)
    for needle in ("Email", "LinkedIn", "Call", "Delivered", "75.0%", "of delivered", "Accepted", "of invited"):
        assert needle in out
    assert "55.6%" in out  # opened 5 of 9 delivered
    assert "Attempted" in out and "Connected" in out and "40.0%" in out

    by_step = render(report(filled, by="step").to_rich_tables())
    assert "Email by step" in by_step and "LinkedIn by step" in by_step and "Call by step" in by_step
    assert "intro" in by_step and "call-1" in by_step and "Total" in by_step
    assert "(none)" in by_step  # the meetings and completions without a step


def test_email_only_report_prints_no_empty_channel(store: Store):
    log = Log()
    log.add("sent", "email", 1)
    log.save(store)
    r = report(store, by="sequence")
    assert [t.title for t in r.to_rich_tables()] == ["Email by sequence"]
    titles = [t.title for t in report(store, by="sequence", sequence="s1", since=JAN).to_rich_tables()]
    assert titles == [f"Email by sequence (sequence=s1, since={JAN.isoformat()})"]
    assert list(r.artifact_tables()) == ["email"]


def test_markdown_and_artifact_tables(filled: Store):
    r = report(filled, by="channel")
    md = r.to_markdown()
    assert md.startswith("# Relance report")
    for heading in ("## Email", "## LinkedIn", "## Call", "## All channels"):
        assert heading in md
    assert "| Sent | 12 |  |  |" in md
    assert "| Delivered | 9 | 75.0% | of sent |" in md
    tables = r.artifact_tables()
    assert list(tables) == ["email", "linkedin", "call", "all"]
    assert tables["call"][1] == {"Metric": "Connected", "Count": 2, "Rate": "40.0%", "Rate basis": "of attempted"}

    steps = report(filled, by="step")
    md = steps.to_markdown()
    assert "## Email by step" in md and "| s1 | intro | 10 |" in md
    email = steps.artifact_tables()["email"]
    assert email[0]["Sequence"] == "s1" and email[0]["Step"] == "intro" and email[0]["Sent"] == 10
    assert email[0]["Open rate"] == "50.0%"
    assert email[-1]["Sequence"] == "Total" and email[-1]["Sent"] == 12


def test_deliverability_per_sender_and_sequence(filled: Store):
    with filled.connect() as conn:
        d = deliverability_report(conn)
    senders = {row["sender"]: row for row in d.by_sender.rows}
    assert list(senders) == [ALICE, BOB, CAROL]
    alice, bob, carol = senders[ALICE], senders[BOB], senders[CAROL]
    # Alice's LinkedIn reply is not an email reply, nor her call a send.
    assert {k: alice[k] for k in ("sent", "delivered", "replied", "auto_replied", "complained", "unsubscribed")} == {
        "sent": 6,
        "delivered": 6,
        "replied": 1,
        "auto_replied": 1,
        "complained": 1,
        "unsubscribed": 1,
    }
    assert alice["complaint_rate"] == pytest.approx(1 / 6) and alice["unsubscribe_rate"] == pytest.approx(1 / 6)
    assert (bob["sent"], bob["delivered"], bob["bounced_hard"], bob["bounced_soft"]) == (4, 2, 2, 1)
    assert (bob["hard_bounce_rate"], bob["soft_bounce_rate"], bob["delivery_rate"]) == (0.5, 0.25, 0.5)
    assert bob["complaint_rate"] == 0.0 and bob["reply_rate"] == 0.0
    assert (carol["sent"], carol["delivery_rate"], carol["auto_reply_rate"]) == (2, 0.5, 0.0)

    sequences = {row["sequence"]: row for row in d.by_sequence.rows}
    assert sequences["s1"]["sent"] == 10 and sequences["s1"]["bounced_hard"] == 2
    assert sequences["s2"]["sent"] == 2
    assert d.totals["sent"] == 12 and d.totals["reply_rate"] == pytest.approx(1 / 12)

    with filled.connect() as conn:
        february = deliverability_report(conn, since=FEB)
    assert [row["sender"] for row in february.by_sender.rows] == [CAROL]

    data = json.loads(d.to_json())
    assert data["by_sender"] == d.by_sender.rows and data["totals"] == d.totals
    lines = list(csv.DictReader(io.StringIO(d.to_csv())))
    assert [(line["by"], line["key"]) for line in lines] == [
        ("sender", ALICE),
        ("sender", BOB),
        ("sender", CAROL),
        ("sequence", "s1"),
        ("sequence", "s2"),
        ("TOTAL", ""),
    ]
    assert int(lines[-1]["sent"]) == 12
    out = render(d.to_rich_tables())
    assert "Email deliverability by sender" in out and "Email deliverability by sequence" in out
    assert BOB in out and "Hard bounces" in out and "Opt-outs" in out
    assert "## Email deliverability by sequence" in d.to_markdown()
    assert list(d.artifact_tables()) == ["deliverability-by-sender", "deliverability-by-sequence"]


# ---------------------------------------------------------------------------- deliverability view


def deliverability_log() -> Log:
    """Alice's mailbox on s1 and Bob's on s2, with every outcome the view counts apart."""
    log = Log()
    alice = {"seq": "s1", "sender": ALICE}
    for t in range(1, 8):
        log.add("sent", "email", t, **alice)
    for t in range(1, 5):
        log.add("delivered", "email", t, **alice)
    log.add("bounced", "email", 5, detail="hard", **alice)
    log.add("bounced", "email", 6, detail="soft", times=2, **alice)  # retried by the provider: one bounce
    log.add("bounced", "email", 7, **alice)  # a bounce nobody classified: a bounce, neither hard nor soft
    log.add("auto_replied", "email", 1, times=2, **alice)  # out of office twice: one auto-reply, no reply
    log.add("replied", "email", 2, **alice)
    log.add("unsubscribed", "email", 3, **alice)
    log.add("complained", "email", 4, **alice)
    log.add("replied", "linkedin", 21, step="invite", **alice)  # not an email
    log.add("sent", "call", 31, step="call-1", **alice)  # not an email
    bob = {"seq": "s2", "sender": BOB, "at": FEB}
    log.add("sent", "email", 41, **bob)
    log.add("delivered", "email", 41, **bob)
    log.add("auto_replied", "email", 41, **bob)  # back from holiday, then a real answer
    log.add("replied", "email", 41, **bob)
    # An opt-out from the footer link: no touch, no mailbox, no sequence on the event.
    log.add("unsubscribed", "email", None, seq=None, step=None, sender=None, at=FEB, enrollment=99)
    return log


def test_deliverability_counts_auto_replies_and_hard_and_soft_bounces_apart(store: Store):
    deliverability_log().save(store)
    with store.connect() as conn:
        d = deliverability_report(conn)
    senders = {row["sender"]: row for row in d.by_sender.rows}
    assert list(senders) == [ALICE, BOB, None]
    metrics = ("sent", "delivered", "bounced", "bounced_hard", "bounced_soft", "complained", "unsubscribed", "auto_replied", "replied")
    assert {k: senders[ALICE][k] for k in metrics} == {
        "sent": 7, "delivered": 4, "bounced": 3, "bounced_hard": 1, "bounced_soft": 1,
        "complained": 1, "unsubscribed": 1, "auto_replied": 1, "replied": 1,
    }
    assert {k: senders[BOB][k] for k in metrics} == {
        "sent": 1, "delivered": 1, "bounced": 0, "bounced_hard": 0, "bounced_soft": 0,
        "complained": 0, "unsubscribed": 0, "auto_replied": 1, "replied": 1,
    }
    assert senders[None]["unsubscribed"] == 1 and senders[None]["sent"] == 0
    assert senders[None]["unsubscribe_rate"] is None  # nothing delivered on that row: no rate, no crash
    a = senders[ALICE]
    assert (a["bounce_rate"], a["hard_bounce_rate"], a["soft_bounce_rate"]) == pytest.approx((3 / 7, 1 / 7, 1 / 7))
    assert (a["auto_reply_rate"], a["reply_rate"], a["delivery_rate"]) == pytest.approx((1 / 7, 1 / 7, 4 / 7))
    assert (a["complaint_rate"], a["unsubscribe_rate"]) == pytest.approx((1 / 4, 1 / 4))

    sequences = {row["sequence"]: row for row in d.by_sequence.rows}
    assert list(sequences) == ["s1", "s2", None]
    assert {k: sequences["s1"][k] for k in metrics} == {k: senders[ALICE][k] for k in metrics}
    assert d.totals["unsubscribed"] == 2 and d.totals["auto_replied"] == 2 and d.totals["replied"] == 2
    assert (d.totals["bounced"], d.totals["bounced_hard"], d.totals["bounced_soft"]) == (3, 1, 1)

    with store.connect() as conn:
        s2 = deliverability_report(conn, sequence="s2")
        january = deliverability_report(conn, until=FEB)
    assert [row["sender"] for row in s2.by_sender.rows] == [BOB] and s2.totals["auto_replied"] == 1
    assert january.totals["sent"] == 7 and january.totals["unsubscribed"] == 1


def test_deliverability_outputs_name_every_column(store: Store):
    deliverability_log().save(store)
    with store.connect() as conn:
        d = deliverability_report(conn, since=JAN)
    data = json.loads(d.to_json())
    assert data["view"] == "deliverability" and data["filters"]["since"] == JAN.isoformat()
    assert {row["sender"] for row in data["by_sender"]} == {ALICE, BOB, None}
    out = render(d.to_rich_tables())
    for needle in ("Email deliverability by sender", "Email deliverability by sequence", "Delivered", "Bounces",
                   "Hard bounces", "Soft bounces", "Complaints", "Opt-outs", "Auto-replies", "Replies", "(none)", "42.9%"):
        assert needle in out, needle
    records = d.artifact_tables()["deliverability-by-sender"]
    assert records[0]["Sender"] == ALICE and records[0]["Auto-replies"] == 1 and records[0]["Soft bounces"] == 1
    assert records[-1]["Sender"] == "Total" and records[-1]["Opt-outs"] == 2
    lines = list(csv.DictReader(io.StringIO(d.to_csv())))
    assert lines[-1]["by"] == "TOTAL" and int(lines[-1]["bounced_soft"]) == 1 and int(lines[-1]["auto_replied"]) == 2
    assert json.loads(report(store).to_json())["view"] == "funnel"

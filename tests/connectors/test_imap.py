"""The IMAP reader against a real Dovecot: the inbound corpus, cursors, UIDVALIDITY, TLS, and
replies to what dispatch really sent, through ingest and the rules, on both backends."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import insert, select

from connectors.imap import MAX_REPLAYS, folder_on_the_wire, poll_mailboxes
from relance.classify import classify
from relance.config import Mailbox, MailServer
from relance.dispatch import Dispatcher
from relance.enrollment import enroll
from relance.errors import TerminalError
from relance.events import EventKind
from relance.ingest import ingest
from relance.store import enrollments, events, mailbox_cursors, prospects, suppressions, touches
from relance.workspace import Workspace
from tests.conftest import at

# A copy of ../shared/corpora/inbound (sources and licences in its README.md), so a
# checkout alone runs the tests.
CORPUS = Path(__file__).resolve().parents[1] / "data" / "inbound"
PARIS = ZoneInfo("Europe/Paris")


@pytest.fixture
def ws(workspace_dir: Path):
    w = Workspace.load(workspace_dir)
    yield w
    w.close()


def mailbox(dovecot, login: str, **settings) -> Mailbox:
    return Mailbox(email=login, name="SDR", imap=MailServer(**dovecot.settings(login, **settings)))


def corpus_files() -> list[Path]:
    files = sorted(p for p in CORPUS.glob("*/*") if p.is_file() and p.name not in ("LICENSE", "labels.json"))
    assert len(files) > 170, f"the inbound corpus is missing from {CORPUS}"
    return files


def message(sender: str, to: str, subject: str, body: str, *, when: datetime, in_reply_to: str | None = None, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes(policy=policy.SMTP)


def cursor(ws: Workspace, box: Mailbox):
    with ws.store.connect() as conn:
        return conn.execute(select(mailbox_cursors).where(mailbox_cursors.c.mailbox == box.email)).one()


# --------------------------------------------------------------------------- the corpus


def test_the_whole_corpus_through_dovecot(dovecot, imap_password, ws):
    """Every corpus message plus replies goes into a real inbox; the events carry the
    classification and the ids to match on; the cursor then holds; unread mail stays unread."""
    login = dovecot.new_account()
    box = mailbox(dovecot, login)
    now = datetime.now(UTC)
    files = corpus_files()
    ours = "<intro-1@acme.example>"
    replies = [
        message("paul@client.example", login, "Re: Votre clôture mensuelle", "Oui, parlons-en jeudi.\n", when=now, in_reply_to=ours),
        message("anna@client.example", login, "Réponse automatique : Votre clôture", "Je suis absente, de retour le lundi 3 mars.\n",
                when=now, in_reply_to=ours, Auto_Submitted="auto-replied"),
        message("zoe@client.example", login, "Re: Votre clôture mensuelle", "Merci de ne plus me contacter.\n", when=now, in_reply_to=ours),
    ]
    raws = [p.read_bytes() for p in files] + replies
    started = time.perf_counter()
    uids = dovecot.append(login, raws)
    by_uid = dict(zip(uids, raws))

    got = list(poll_mailboxes(ws, [box], now))
    elapsed = time.perf_counter() - started
    print(f"\n{len(raws)} messages appended and read back from Dovecot in {elapsed:.2f} s, {len(got)} events")

    # Each message gives the events its classification says, in UID order.
    expected = []
    for uid in uids:
        verdict = classify(by_uid[uid], received_at=now, own_addresses=(login,))
        if verdict.kind is not None:
            expected.extend((uid, verdict.kind, verdict.detail, addr) for addr in (verdict.about or (None,)))
    assert [(e.payload["uid"], e.kind, e.detail, e.recipient) for e in got] == expected
    assert len(got) > 150
    assert {e.kind for e in got} == {EventKind.bounced, EventKind.auto_replied, EventKind.replied, EventKind.unsubscribed}
    assert all(e.occurred_at <= now and e.dedupe_key.startswith("imap:") for e in got)

    # The ids to match on: the original Message-ID inside a DSN, In-Reply-To of a reply.
    dsn = next(e for e in got if e.payload["uid"] == uids[files.index(CORPUS / "node-baunsu" / "bounce_gmail.txt")])
    assert (dsn.kind, dsn.detail, dsn.recipient) == (EventKind.bounced, "hard", "mango3432xlkdieldkl@gmail.com")
    assert dsn.message_id == "<20120123061701.C9DA11226@m.sender.com>" and dsn.payload["status"] == "5.1.1"
    soft = next(e for e in got if e.payload["uid"] == uids[files.index(CORPUS / "flufl-bounce" / "dsn_06.txt")])
    assert (soft.detail, soft.recipient) == ("soft", "userx@example.com")
    reply, auto, optout = got[-3:]
    assert (reply.kind, reply.message_id, reply.recipient) == (EventKind.replied, ours, "paul@client.example")
    assert (auto.kind, auto.message_id) == (EventKind.auto_replied, ours) and auto.detail.endswith("-03-03")
    assert (optout.kind, optout.recipient) == (EventKind.unsubscribed, "zoe@client.example")
    json.dumps([dict(e.payload) for e in got])  # payloads go into a JSON column

    # The cursor is at the last UID; a second poll hands over nothing; nothing was marked read.
    ingest(ws, got, now)
    assert (cursor(ws, box).last_uid, cursor(ws, box).uidvalidity) == (uids[-1], dovecot.uidvalidity(login))
    assert list(poll_mailboxes(ws, [box], now)) == []
    assert dovecot.seen(login) == []

    # A message that arrives later is picked up alone.
    [late] = dovecot.append(login, [message("paul@client.example", login, "Re: Votre clôture", "Autre question.\n", when=now, in_reply_to=ours)])
    [event] = list(poll_mailboxes(ws, [box], now))
    assert (event.payload["uid"], event.kind) == (late, EventKind.replied)


def test_a_malformed_message_never_stops_the_others(dovecot, imap_password, ws):
    login = dovecot.new_account()
    box = mailbox(dovecot, login)
    now = datetime.now(UTC)
    good = [message(f"p{i}@client.example", login, "Re: hello", f"Reply {i}\n", when=now, in_reply_to="<x@acme.example>") for i in range(3)]
    broken = [
        b"\xff\xfe\x00garbage with no header at all\r\n",
        b"From: <<<@>>>\r\nSubject: =?unknown-8bit?Q?=FF?=\r\nContent-Type: multipart/mixed; boundary=\"never\"\r\n\r\n--never\r\nContent-Type: text/plain; charset=klingon\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64\r\n",
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno parts here\r\n",
        b"From: a@b.example\r\nDate: not a date\r\nMessage-ID: <>\r\nIn-Reply-To: <<<\r\n\r\n" + b"x" * 200_000 + b"\r\n",
    ]
    uids = dovecot.append(login, [good[0], broken[0], broken[1], good[1], broken[2], broken[3], good[2]])
    got = list(poll_mailboxes(ws, [box], now))
    replied = [e for e in got if e.kind == EventKind.replied and e.recipient and e.recipient.startswith("p")]
    assert [e.payload["uid"] for e in replied] == [uids[0], uids[3], uids[6]]
    ingest(ws, got, now)
    assert cursor(ws, box).last_uid == uids[-1]
    assert list(poll_mailboxes(ws, [box], now)) == []


# --------------------------------------------------------------------------- the cursor


def test_uidvalidity_change_reads_the_folder_again_without_duplicate_events(dovecot, imap_password, ws):
    login = dovecot.new_account()
    folder = "Relance Replies"  # a name with a space: quoted on the wire
    box = mailbox(dovecot, login, folder=folder)
    now = datetime.now(UTC)
    first = [message(f"p{i}@client.example", login, "Re: hello", f"Reply {i}\n", when=now, in_reply_to="<x@acme.example>") for i in range(3)]
    dovecot.append(login, first, folder=folder)
    assert ingest(ws, poll_mailboxes(ws, [box], now), now).recorded == 3
    before = cursor(ws, box).uidvalidity

    # The folder is deleted and recreated (as a server migration would): new UIDVALIDITY,
    # UIDs start again at 1, and the same three messages come back with a new one.
    dovecot.recreate(login, folder)
    new = message("p9@client.example", login, "Re: hello", "A new reply\n", when=now, in_reply_to="<x@acme.example>")
    dovecot.append(login, [*first, new], folder=folder)
    after = dovecot.uidvalidity(login, folder)
    assert after != before
    got = list(poll_mailboxes(ws, [box], now))
    assert len(got) == 4
    summary = ingest(ws, got, now)
    assert (summary.recorded, summary.duplicates) == (1, 3)
    assert (cursor(ws, box).uidvalidity, cursor(ws, box).last_uid) == (after, 4)
    assert list(poll_mailboxes(ws, [box], now)) == []


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("INBOX", "INBOX"),
        ("Relance Replies", "Relance Replies"),
        ("Réponses", "R&AOk-ponses"),
        ("Devis & Factures", "Devis &- Factures"),
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501's own example
    ],
)
def test_folder_names_go_on_the_wire_in_modified_utf7(name, wire):
    assert folder_on_the_wire(name) == wire


def test_a_folder_with_accents_and_an_ampersand_is_read(dovecot, imap_password, ws):
    """Created under its wire name spelled by hand: Dovecot refuses a CREATE that is not valid
    modified UTF-7, and the reader must open it from the name config.yaml writes."""
    login = dovecot.new_account()
    now = datetime.now(UTC)
    dovecot.append(login, [message("p1@client.example", login, "Re: hello", "Oui\n", when=now, in_reply_to="<x@acme.example>")],
                   folder="R&AOk-ponses &- relances")  # fmt: skip
    box = mailbox(dovecot, login, folder="Réponses & relances")
    assert [e.kind for e in poll_mailboxes(ws, [box], now)] == [EventKind.replied]


def test_a_batch_that_never_reached_the_event_log_is_read_again(dovecot, imap_password, ws):
    """poll then crash before ingest commits: the next poll hands the same events over again,
    a bounded number of times, and the dedupe keys keep the log exact."""
    login = dovecot.new_account()
    box = mailbox(dovecot, login)
    now = datetime.now(UTC)
    dovecot.append(login, [message(f"p{i}@client.example", login, "Re: hello", "Yes\n", when=now, in_reply_to="<x@acme.example>") for i in range(2)])
    lost = list(poll_mailboxes(ws, [box], now))  # taken, never ingested
    assert len(lost) == 2
    again = list(poll_mailboxes(ws, [box], now))
    assert [e.dedupe_key for e in again] == [e.dedupe_key for e in lost]
    assert ingest(ws, again, now).recorded == 2
    assert list(poll_mailboxes(ws, [box], now)) == []

    # A consumer that keeps dropping events cannot make the reader loop forever.
    dovecot.append(login, [message("p7@client.example", login, "Re: hello", "Yes\n", when=now, in_reply_to="<x@acme.example>")])
    rounds = [len(list(poll_mailboxes(ws, [box], now))) for _ in range(MAX_REPLAYS + 3)]
    assert rounds == [1] * (MAX_REPLAYS + 1) + [0, 0]


def test_a_consumer_that_stops_early_leaves_the_cursor(dovecot, imap_password, ws):
    login = dovecot.new_account()
    box = mailbox(dovecot, login)
    now = datetime.now(UTC)
    dovecot.append(login, [message(f"p{i}@client.example", login, "Re: hello", "Yes\n", when=now, in_reply_to="<x@acme.example>") for i in range(3)])
    reader = poll_mailboxes(ws, [box], now)
    next(reader)
    reader.close()  # ingest raised after the first event
    assert len(list(poll_mailboxes(ws, [box], now))) == 3


# --------------------------------------------------------------------------- connections


def test_starttls_and_implicit_tls_and_bad_settings(dovecot, imap_password, ws):
    login = dovecot.new_account()
    now = datetime.now(UTC)
    dovecot.append(login, [message("p1@client.example", login, "Re: hello", "Yes\n", when=now, in_reply_to="<x@acme.example>")])
    tls = dovecot.tls_context()
    for security in ("starttls", "ssl"):
        box = Mailbox(email=f"{security}-{login}", name="SDR", imap=MailServer(**dovecot.settings(login, security=security)))
        [event] = list(poll_mailboxes(ws, [box], now, tls=tls))
        assert event.kind == EventKind.replied

    # An untrusted certificate, a wrong password, a missing folder: each mailbox fails alone,
    # typed, and the good one after them is still read.
    errors: list = []
    untrusted = Mailbox(email="u@acme.example", name="U", imap=MailServer(**dovecot.settings(login, security="ssl")))
    wrong = Mailbox(email="w@acme.example", name="W", imap=MailServer(**{**dovecot.settings(login), "password_env": "NOPE_PASSWORD"}))
    missing = Mailbox(email="m@acme.example", name="M", imap=MailServer(**dovecot.settings(login, folder="Nowhere")))
    good = Mailbox(email="g@acme.example", name="G", imap=MailServer(**dovecot.settings(login)))
    got = list(poll_mailboxes(ws, [untrusted, wrong, missing, good], now, errors=errors))
    assert [e.kind for e in got] == [EventKind.replied]
    assert [type(e).__name__ for e in errors] == ["TerminalError", "ConfigError", "ConfigError"]
    assert "certificate" in str(errors[0]) and "NOPE_PASSWORD" in str(errors[1]) and "Nowhere" in str(errors[2])


def test_a_refused_login_is_terminal(dovecot, imap_password, ws, monkeypatch):
    login = dovecot.new_account()
    monkeypatch.setenv("RELANCE_TEST_IMAP_PASSWORD", "wrong")
    errors: list = []
    assert list(poll_mailboxes(ws, [mailbox(dovecot, login)], datetime.now(UTC), errors=errors)) == []
    assert isinstance(errors[0], TerminalError) and "login refused" in str(errors[0])


# --------------------------------------------------------------------------- end to end

MONDAY = at("2027-03-15T07:00:00")  # 08:00 in Paris


def test_replies_to_what_dispatch_sent_end_the_cadence_or_pause_it(dovecot, imap_password, ws):
    """Three prospects get the intro; one replies (quoting it, opt-out footer included), one is
    out of office until the 29th, one bounces. Read from Dovecot, ingested, rules applied."""
    login = dovecot.new_account()
    box = mailbox(dovecot, login)
    # The reader has watched the inbox since before the campaign (its first poll reads the
    # last FIRST_READ_DAYS by arrival date, and Dovecot dates arrivals by the real clock).
    assert list(poll_mailboxes(ws, [box], MONDAY)) == []
    people = [
        {"email": f"p{i}@client{i}.example", "first_name": f"P{i}", "last_name": "X", "company": f"Client {i}",
         "linkedin_url": f"https://www.linkedin.com/in/p{i}",
         "timezone": "Europe/Paris", "country": "FR", "attributes": {}, "created_at": MONDAY, "updated_at": MONDAY}
        for i in range(1, 4)
    ]
    with ws.store.begin() as conn:
        ids = list(conn.execute(insert(prospects).returning(prospects.c.id, sort_by_parameter_order=True), people).scalars())
    enroll(ws, ws.sequence("outbound"), ids, MONDAY)
    sent_at = at("2027-03-15T09:30:00")
    assert Dispatcher(ws).run(sent_at).sent == {"email": 3}
    with ws.store.connect() as conn:
        intros = {r.prospect_id: r for r in conn.execute(select(touches).where(touches.c.step_id == "intro"))}
    sent = {}
    for eml in (ws.root / "outbox" / "email").glob("*.eml"):
        msg = message_from_bytes(eml.read_bytes(), policy=policy.default)
        sent[msg["To"].addresses[0].addr_spec] = msg
    p1, p2, p3 = ids

    def quoting(original: EmailMessage, text: str) -> str:
        quoted = "\n".join(f"> {line}" for line in original.get_body(("plain",)).get_content().splitlines())
        return f"{text}\n\nLe lun. 15 mars 2027 à 10:30, Marie Dupont <marie@acme.example> a\nécrit :\n{quoted}\n"

    first = sent["p1@client1.example"]
    assert first["Message-ID"] == intros[p1].message_id
    reply = message("P1 X <p1@client1.example>", first["From"], f"Re: {first['Subject']}",
                    quoting(first, "Bonjour Marie, oui, appelons-nous jeudi."), when=at("2027-03-15T11:00:00"),
                    in_reply_to=first["Message-ID"])
    second = sent["p2@client2.example"]
    away = message("p2@client2.example", second["From"], f"Réponse automatique : {second['Subject']}",
                   "Bonjour,\nJe suis absent du bureau et serai de retour le lundi 29 mars.\nCordialement",
                   when=at("2027-03-15T10:31:00"), in_reply_to=second["Message-ID"], Auto_Submitted="auto-replied")
    third = sent["p3@client3.example"]
    bounce = dsn(third, status="5.1.1", diagnostic="smtp; 550 5.1.1 <p3@client3.example>: user unknown")
    dovecot.append(login, [reply, away, bounce])

    now = at("2027-03-15T12:05:00")
    summary = ingest(ws, poll_mailboxes(ws, [box], now), now)
    assert (summary.recorded, summary.unmatched) == (3, 0)
    with ws.store.connect() as conn:
        rows = {r.prospect_id: r for r in conn.execute(select(events).where(events.c.kind.in_(["replied", "auto_replied", "bounced"])))}
        enr = {r.prospect_id: r for r in conn.execute(select(enrollments))}
        suppressed = set(conn.execute(select(suppressions.c.value)).scalars())
    assert {pid: (r.kind, r.touch_id, r.detail) for pid, r in rows.items()} == {
        p1: ("replied", intros[p1].id, None),
        p2: ("auto_replied", intros[p2].id, "2027-03-29"),
        p3: ("bounced", intros[p3].id, "hard"),
    }
    assert (enr[p1].state, enr[p1].reason) == ("exited", "replied received")
    assert enr[p3].state == "exited" and "p3@client3.example" in suppressed
    assert "p1@client1.example" not in suppressed  # the quoted opt-out footer is not an opt-out
    # p2 stays active; the next step waits for the first opening of its calendar after the
    # return date: Monday 29 March 2027 is Easter Monday (a French holiday), so Tuesday the
    # 30th, 09:00 in Paris (summer time since the 28th), plus at most the jitter.
    assert enr[p2].state == "active"
    opening = datetime(2027, 3, 30, 9, 0, tzinfo=PARIS)
    assert opening <= enr[p2].next_due_at < opening + timedelta(minutes=10)
    # Dispatch before then sends nothing to p2; on the 29th the cadence resumes by itself.
    assert Dispatcher(ws).run(at("2027-03-26T15:00:00")).claimed == 0
    assert Dispatcher(ws).run(enr[p2].next_due_at).sent == {"linkedin": 1}


def dsn(original: EmailMessage, *, status: str, diagnostic: str) -> bytes:
    """A delivery-status report (RFC 3464) returning `original`'s headers, as Postfix writes one,
    including the Auto-Submitted header that must not make it an auto-reply."""
    rcpt = original["To"].addresses[0].addr_spec
    headers = "".join(f"{k}: {v}\n" for k, v in original.items())
    text = f"""\
From: Mail Delivery System <MAILER-DAEMON@mx.client3.example>
To: {original["From"]}
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
Date: {format_datetime(at("2027-03-15T10:32:00"))}
Message-ID: {make_msgid(domain="mx.client3.example")}
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="dsn-boundary"

--dsn-boundary
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not be delivered.

<{rcpt}>: user unknown

--dsn-boundary
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.client3.example

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: {status}
Diagnostic-Code: {diagnostic}

--dsn-boundary
Content-Type: text/rfc822-headers

{headers}
--dsn-boundary--
"""
    return text.encode()


def test_replies_to_what_the_smtp_connector_really_sent(dovecot, imap_password, smtp_server, workspace_dir):
    """The whole email loop on live servers: dispatch sends through the SMTP connector to
    aiosmtpd; the prospect's reply to the message that arrived there lands in the sender's
    Dovecot inbox; `poll_all` asks the SMTP connector, which reads it through this reader."""
    import yaml

    from relance.ingest import poll_all

    accounts = {"marie@acme.example": dovecot.new_account(), "lea@acme.example": dovecot.new_account()}
    config = yaml.safe_load((workspace_dir / "config.yaml").read_text())
    config["connectors"]["email"] = {"use": "smtp", "settings": {"relay": smtp_server.settings(), "helo_hostname": "relance.test"}}
    for box in config["senders"]["sales"]:
        box["imap"] = dovecot.settings(accounts[box["email"]])
    (workspace_dir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    ws = Workspace.load(workspace_dir)
    try:
        assert poll_all(ws, MONDAY).received == 0  # the reader starts watching both inboxes
        people = [{"email": f"p{i}@client{i}.example", "first_name": f"P{i}", "company": f"Client {i}", "timezone": "Europe/Paris",
                   "country": "FR", "attributes": {}, "created_at": MONDAY, "updated_at": MONDAY} for i in (1, 2)]
        with ws.store.begin() as conn:
            p1, p2 = conn.execute(insert(prospects).returning(prospects.c.id, sort_by_parameter_order=True), people).scalars()
        enroll(ws, ws.sequence("outbound"), [p1, p2], MONDAY)
        assert Dispatcher(ws).run(at("2027-03-15T09:30:00")).sent == {"email": 2}
        arrived = {r.message["To"].addresses[0].addr_spec: r.message for r in smtp_server.recorder.received}
        assert set(arrived) == {"p1@client1.example", "p2@client2.example"}

        first, second = arrived["p1@client1.example"], arrived["p2@client2.example"]
        reply = message("p1@client1.example", str(first["From"]), f"Re: {first['Subject']}", "Volontiers, jeudi 10 h ?\n",
                        when=at("2027-03-15T10:00:00"), in_reply_to=first["Message-ID"])
        away = message("p2@client2.example", str(second["From"]), f"Automatic reply: {second['Subject']}",
                       "I am out of the office until Friday 19 March.\n", when=at("2027-03-15T09:31:00"),
                       in_reply_to=second["Message-ID"], Auto_Submitted="auto-replied")
        dovecot.append(accounts[first["From"].addresses[0].addr_spec], [reply])
        dovecot.append(accounts[second["From"].addresses[0].addr_spec], [away])

        now = at("2027-03-15T10:05:00")
        summary = poll_all(ws, now)
        assert (summary.recorded, summary.unmatched, summary.exited) == (2, 0, 1)
        with ws.store.connect() as conn:
            enr = {r.prospect_id: r for r in conn.execute(select(enrollments))}
        assert enr[p1].state == "exited"
        opening = datetime(2027, 3, 22, 9, 0, tzinfo=PARIS)  # "until Friday 19": back Saturday, so Monday 22 at 09:00
        assert enr[p2].state == "active" and opening <= enr[p2].next_due_at < opening + timedelta(minutes=10)
        assert poll_all(ws, now).received == 0
    finally:
        ws.close()

"""The sandbox records real messages, answers idempotently and simulates responses faithfully,
since every demo and every benchmark stands on it."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
import unicodedata
from collections import Counter
from datetime import datetime, timedelta, timezone
from email import policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from connectors.sandbox import (
    DEFAULT_RATES,
    SandboxCall,
    SandboxEmail,
    SandboxLinkedIn,
    SandboxSettings,
    provider_message_id,
    sign_webhook,
)
from relance.channels import InboundEvent, OutboundTouch, Sender
from relance.email_message import make_message_id
from relance.errors import TerminalError, TransientError, Unauthenticated
from relance.events import Channel, EventKind

NOW = datetime(2026, 3, 2, 8, 30, tzinfo=timezone.utc)  # Monday 09:30 in Paris
FAR = NOW + timedelta(days=60)
MARIE = Sender("marie.dupont@acme-finance.example", "Marie Dupont", "Marie Dupont\nAcme Finance")
LEA = Sender("lea.martin@acme-finance.example", "Léa Martin", "Léa Martin\nAcme Finance")
PEOPLE = [
    ("Zoé", "Bouchard", "Société Générale d'Équipement", "sge-equipement.example"),
    ("François", "Lefèvre", "Brasserie du Faubourg", "brasserie-faubourg.example"),
    ("Hélène", "Moreau-Château", "Crêperie Kéranna", "keranna.example"),
    ("Jérôme", "Dubœuf", "Vignobles Dubœuf", "vignobles-duboeuf.example"),
    ("Anaïs", "N'Guessan", "Fintech Ébène", "ebene.example"),
]


def ascii_fold(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def person(i: int) -> tuple[str, str, str, str]:
    return PEOPLE[i % len(PEOPLE)]


def email_touch(i: int, **overrides) -> OutboundTouch:
    first, last, company, domain = person(i)
    sender = MARIE if i % 2 else LEA
    key = overrides.pop("idempotency_key", f"enr-{i}:intro:1")
    values = dict(
        touch_id=10_000 + i,
        idempotency_key=key,
        channel=Channel.email,
        action="send",
        recipient=f"{ascii_fold(first).lower()}.{i}@{domain}",
        recipient_name=f"{first} {last}",
        sender=sender,
        subject=f"{first}, une question sur la trésorerie de {company}",
        body=f"Bonjour {first},\n\nJ'ai vu que {company} recrutait à Lyon.\n\nBien à vous,\n{sender.signature}\n",
        message_id=make_message_id(sender.address, key),
        unsubscribe_url=f"https://acme-finance.example/u/tok-{i}.sig",
        unsubscribe_mailto=f"mailto:{sender.address}?subject=unsubscribe",
    )
    values.update(overrides)
    return OutboundTouch(**values)


def linkedin_touch(i: int, action: str = "invite", **overrides) -> OutboundTouch:
    first, last, company, _ = person(i)
    values = dict(
        touch_id=20_000 + i,
        idempotency_key=f"enr-{i}:{action}:1",
        channel=Channel.linkedin,
        action=action,
        recipient=f"https://www.linkedin.com/in/{first.lower()}-{last.lower()}-{i}",
        recipient_name=f"{first} {last}",
        sender=MARIE,
        body="" if action == "visit" else f"Bonjour {first}, ravie d'échanger sur la finance chez {company}.",
    )
    values.update(overrides)
    return OutboundTouch(**values)


def call_touch(i: int, **overrides) -> OutboundTouch:
    first, last, company, _ = person(i)
    values = dict(
        touch_id=30_000 + i,
        idempotency_key=f"enr-{i}:call-1:1",
        channel=Channel.call,
        action="call",
        recipient=f"+3361{i:07d}",
        recipient_name=f"{first} {last}",
        sender=LEA,
        body=f"Script : se présenter, rappeler l'email à {first} sur la trésorerie de {company}.",
    )
    values.update(overrides)
    return OutboundTouch(**values)


def make(cls, tmp_path: Path, **settings):
    return cls(SandboxSettings(**settings), workspace=SimpleNamespace(root=tmp_path))


def drain(connector, now: datetime = FAR) -> list[InboundEvent]:
    events: list[InboundEvent] = []
    while batch := connector.poll(now):
        events.extend(batch)
    return events


def tolerance(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n) + 0.002


def rows(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "outbox" / "sandbox.db") as conn:
        return conn.execute(sql).fetchall()


# ---------------------------------------------------------------------------- recording


def test_email_is_written_as_a_parseable_eml_with_the_right_headers(tmp_path):
    sandbox = make(SandboxEmail, tmp_path)
    touch = email_touch(1)
    (result,) = sandbox.send_batch([touch], NOW)

    assert result.touch_id == touch.touch_id and result.error is None
    assert result.provider_message_id.startswith("sandbox-")
    files = list((tmp_path / "outbox" / "email").glob("*.eml"))
    assert len(files) == 1 and files[0].name.startswith("enr-1_intro_1")
    msg = BytesParser(policy=policy.default).parsebytes(files[0].read_bytes())
    assert msg["From"].addresses[0].addr_spec == MARIE.address
    assert msg["From"].addresses[0].display_name == "Marie Dupont"
    assert msg["To"].addresses[0].display_name == "François Lefèvre"
    assert msg["To"].addresses[0].addr_spec == touch.recipient
    assert msg["Subject"] == "François, une question sur la trésorerie de Brasserie du Faubourg"
    assert parsedate_to_datetime(msg["Date"]) == NOW  # the simulated clock, not the wall clock
    assert msg["Message-ID"] == touch.message_id
    assert msg["X-Relance-Touch"] == "enr-1:intro:1"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "https://acme-finance.example/u/tok-1.sig" in msg["List-Unsubscribe"]
    assert msg.get_content().replace("\r\n", "\n") == touch.body


def test_keys_that_are_not_file_names_stay_inside_the_outbox(tmp_path):
    sandbox = make(SandboxEmail, tmp_path)
    touches = [email_touch(1, idempotency_key="../../etc/passwd"), email_touch(2, idempotency_key="enr 2/intro:é")]
    assert all(r.error is None for r in sandbox.send_batch(touches, NOW))
    names = sorted(p.name for p in (tmp_path / "outbox" / "email").iterdir())
    assert len(names) == 2 and all(n.endswith(".eml") and "/" not in n and not n.startswith(".") for n in names)
    assert not (tmp_path / "etc").exists()


def test_linkedin_and_calls_are_appended_as_json_lines(tmp_path):
    linkedin, call = make(SandboxLinkedIn, tmp_path), make(SandboxCall, tmp_path)
    linkedin.send_batch([linkedin_touch(0, "visit"), linkedin_touch(1, "invite"), linkedin_touch(2, "message")], NOW)
    call.send_batch([call_touch(3)], NOW)
    lines = [json.loads(x) for x in (tmp_path / "outbox" / "linkedin.jsonl").read_text("utf-8").splitlines()]
    assert [x["action"] for x in lines] == ["visit", "invite", "message"]
    assert lines[1]["recipient"] == "https://www.linkedin.com/in/françois-lefèvre-1"
    assert lines[1]["recipient_name"] == "François Lefèvre"
    assert lines[1]["sender"] == MARIE.address
    assert lines[2]["body"].startswith("Bonjour Hélène")
    assert datetime.fromisoformat(lines[0]["at"]) == NOW
    (called,) = [json.loads(x) for x in (tmp_path / "outbox" / "call.jsonl").read_text("utf-8").splitlines()]
    assert called["recipient"] == "+33610000003" and "Jérôme" in called["body"]


def test_a_line_left_torn_by_a_crash_is_not_continued(tmp_path):
    """A worker killed mid-write (or a full disk) may leave the last line unfinished: the next
    batch starts on a line of its own, so only the torn line is unreadable."""
    linkedin = make(SandboxLinkedIn, tmp_path)
    linkedin.send_batch([linkedin_touch(0, "visit")], NOW)
    path = tmp_path / "outbox" / "linkedin.jsonl"
    path.write_bytes(path.read_bytes() + b'{"at": "2027-01-1')
    linkedin.send_batch([linkedin_touch(1, "invite"), linkedin_touch(2, "message")], NOW)
    lines = path.read_text("utf-8").splitlines()
    assert len(lines) == 4 and lines[1] == '{"at": "2027-01-1'
    assert [json.loads(x)["action"] for x in (lines[0], *lines[2:])] == ["visit", "invite", "message"]


def test_email_jsonl_mode_for_load_runs(tmp_path):
    sandbox = make(SandboxEmail, tmp_path, email_record="jsonl")
    sandbox.send_batch([email_touch(1), email_touch(2)], NOW)
    lines = [json.loads(x) for x in (tmp_path / "outbox" / "email.jsonl").read_text("utf-8").splitlines()]
    assert [x["subject"] for x in lines] == [email_touch(1).subject, email_touch(2).subject]
    assert lines[0]["message_id"] == email_touch(1).message_id
    assert not (tmp_path / "outbox" / "email").exists()


def test_nothing_is_created_until_first_use_and_outbox_follows_the_workspace(tmp_path):
    sandbox = make(SandboxEmail, tmp_path, outbox="var/outbox")
    assert sandbox.outbox == tmp_path / "var" / "outbox"
    assert not (tmp_path / "var").exists()
    absolute = tmp_path / "elsewhere"
    assert make(SandboxEmail, tmp_path, outbox=str(absolute)).outbox == absolute
    assert SandboxEmail(SandboxSettings()).outbox == Path.cwd() / "outbox"


# ------------------------------------------------------------------------- idempotency


def test_resending_an_accepted_key_returns_the_same_id_and_writes_nothing(tmp_path):
    sandbox = make(SandboxEmail, tmp_path)
    touches = [email_touch(i) for i in range(5)]
    first = {r.touch_id: r.provider_message_id for r in sandbox.send_batch(touches, NOW)}
    assert all(first.values())
    eml = sorted((tmp_path / "outbox" / "email").glob("*.eml"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in eml}
    sandbox.poll(NOW)  # draws the responses (none due yet)
    scheduled = rows(tmp_path, "SELECT count(*) FROM responses")[0][0]
    assert scheduled >= 5

    later = NOW + timedelta(hours=2)  # a retry after a crash, with a new Date it must not write
    again = make(SandboxEmail, tmp_path)  # a fresh process
    results = again.send_batch(touches + [email_touch(2)], later)
    assert {r.touch_id: r.provider_message_id for r in results} == first
    assert len(results) == 6 and all(r.error is None for r in results)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in eml} == before
    again.poll(NOW)
    assert rows(tmp_path, "SELECT count(*) FROM responses")[0][0] == scheduled
    assert rows(tmp_path, "SELECT count(*) FROM accepted")[0][0] == 5


@pytest.mark.parametrize(("cls", "touch", "settings"), [
    (SandboxLinkedIn, lambda i: linkedin_touch(i, "invite"), {}),
    (SandboxEmail, email_touch, {"email_record": "jsonl"}),
])  # fmt: skip
def test_a_send_that_died_after_writing_its_lines_is_not_written_again(tmp_path, monkeypatch, cls, touch, settings):
    """The lines went out, the acceptance never committed (the process died in between): the
    resend after the restart answers those keys from their lines instead of writing them twice."""
    outbox = tmp_path / "outbox" / f"{cls.channel.value}.jsonl"
    make(cls, tmp_path, **settings).send_batch([touch(0)], NOW)
    dying = make(cls, tmp_path, **settings)
    monkeypatch.setattr(dying, "_accepted_row", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(TransientError):
        dying.send_batch([touch(1), touch(2)], NOW)
    monkeypatch.undo()
    assert len(outbox.read_text().splitlines()) == 3  # out, but not accepted
    with outbox.open("ab") as fh:
        fh.write(b'{"at": "2027-03-15T09:00:0')  # and a line torn by the kill

    restarted = make(cls, tmp_path, **settings)
    results = restarted.send_batch([touch(1), touch(2), touch(3)], NOW)
    assert all(r.error is None for r in results)
    assert [r.provider_message_id for r in results] == [provider_message_id(touch(i).idempotency_key) for i in (1, 2, 3)]
    keys = [json.loads(line)["idempotency_key"] for line in outbox.read_text().splitlines() if line.startswith('{"at":"')]
    assert sorted(keys) == sorted(touch(i).idempotency_key for i in range(4))  # each once
    assert rows(tmp_path, "SELECT count(*) FROM accepted")[0][0] == 4


def test_a_key_twice_in_one_batch_is_sent_once(tmp_path):
    linkedin = make(SandboxLinkedIn, tmp_path)
    touch = linkedin_touch(1, "invite")
    twin = linkedin_touch(1, "invite", touch_id=99_999)
    a, b = linkedin.send_batch([touch, twin], NOW)
    assert (a.touch_id, b.touch_id) == (touch.touch_id, 99_999)
    assert a.provider_message_id == b.provider_message_id
    assert len((tmp_path / "outbox" / "linkedin.jsonl").read_text("utf-8").splitlines()) == 1


def test_bad_touches_fail_alone(tmp_path):
    email = make(SandboxEmail, tmp_path)
    good, bad_address, wrong_channel = email_touch(1), email_touch(2, recipient="françois.lefèvre"), linkedin_touch(3)
    results = {r.touch_id: r for r in email.send_batch([good, bad_address, wrong_channel], NOW)}
    assert results[good.touch_id].error is None
    assert isinstance(results[bad_address.touch_id].error, TerminalError)
    assert isinstance(results[wrong_channel.touch_id].error, TerminalError)
    assert len(list((tmp_path / "outbox" / "email").glob("*.eml"))) == 1
    (linkedin_result,) = make(SandboxLinkedIn, tmp_path).send_batch([linkedin_touch(4, "poke")], NOW)
    assert isinstance(linkedin_result.error, TerminalError) and "poke" in str(linkedin_result.error)


def test_several_processes_share_one_outbox(tmp_path):
    """Three workers race on the same 120 keys: each is accepted, recorded and scheduled once."""
    script = textwrap.dedent(
        f"""
        import sys
        from types import SimpleNamespace
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sandbox import email_touch, linkedin_touch, NOW
        from connectors.sandbox import SandboxEmail, SandboxLinkedIn, SandboxSettings
        ws = SimpleNamespace(root=Path({str(tmp_path)!r}))
        email, linkedin = SandboxEmail(SandboxSettings(), workspace=ws), SandboxLinkedIn(SandboxSettings(), workspace=ws)
        order = range(120) if sys.argv[1] != "1" else range(119, -1, -1)
        touches = [email_touch(i) for i in order]
        for start in range(0, 120, 10):
            for r in email.send_batch(touches[start:start + 10], NOW):
                assert r.error is None, r.error
                print(r.touch_id, r.provider_message_id)
            linkedin.send_batch([linkedin_touch(i, "message") for i in order][start:start + 10], NOW)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    ids = [dict(line.split() for line in out.splitlines()) for out, _ in outputs]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 120

    reference = tmp_path / "reference"
    reference.mkdir()
    make(SandboxEmail, reference).send_batch([email_touch(i) for i in range(120)], NOW)
    make(SandboxLinkedIn, reference).send_batch([linkedin_touch(i, "message") for i in range(120)], NOW)
    assert len(list((tmp_path / "outbox" / "email").glob("*.eml"))) == 120
    assert len((tmp_path / "outbox" / "linkedin.jsonl").read_text("utf-8").splitlines()) == 120
    for root in (tmp_path, reference):
        for connector in (SandboxEmail, SandboxLinkedIn):
            make(connector, root).poll(NOW)
    count = "SELECT channel, count(*) FROM responses GROUP BY channel ORDER BY channel"
    assert rows(tmp_path, count) == rows(reference, count)
    assert rows(tmp_path, "SELECT count(*) FROM accepted WHERE drawn = 0") == [(0,)]


# ----------------------------------------------------------------------- simulation


def _signature(events: list[InboundEvent]) -> list[tuple]:
    return [(e.dedupe_key, e.kind, e.occurred_at, e.detail) for e in events]


def test_responses_are_deterministic_for_a_seed(tmp_path):
    def run(root: Path, seed: int) -> list[tuple]:
        root.mkdir()
        email = make(SandboxEmail, root, seed=seed, email_record="jsonl")
        email.send_batch([email_touch(i) for i in range(300)], NOW)
        return _signature(drain(email))

    a, b, c = run(tmp_path / "a", 7), run(tmp_path / "b", 7), run(tmp_path / "c", 8)
    assert a == b
    assert a != c
    assert len(a) > 300


def test_events_carry_what_ingest_matches_on(tmp_path):
    email = make(SandboxEmail, tmp_path, email_record="jsonl")
    touches = {t.idempotency_key: t for t in (email_touch(i) for i in range(200))}
    results = {r.touch_id: r.provider_message_id for r in email.send_batch(list(touches.values()), NOW)}
    events = drain(email)
    assert events and all(isinstance(e, InboundEvent) for e in events)
    for e in events:
        t = touches[e.idempotency_key]
        assert e.channel == Channel.email
        assert e.dedupe_key == f"sandbox:{t.idempotency_key}:{e.kind.value}"
        assert e.touch_id == t.touch_id
        assert e.provider_message_id == results[t.touch_id]
        assert e.message_id == t.message_id
        assert e.recipient == t.recipient
        assert e.occurred_at.tzinfo is not None and e.occurred_at > NOW
    bounces = [e for e in events if e.kind == EventKind.bounced]
    assert bounces and all(e.detail in ("hard", "soft") and e.payload["reason"] for e in bounces)
    assert len({e.dedupe_key for e in events}) == len(events)


def test_email_rates_and_causality_over_5000_touches(tmp_path):
    n = 5000
    email = make(SandboxEmail, tmp_path, email_record="jsonl")
    touches = [email_touch(i) for i in range(n)]
    for start in range(0, n, 500):
        email.send_batch(touches[start : start + 500], NOW)
    events = drain(email)
    by_touch: dict[str, dict[EventKind, InboundEvent]] = {}
    for e in events:
        assert e.kind not in by_touch.setdefault(e.idempotency_key, {})
        by_touch[e.idempotency_key][e.kind] = e
    kinds = Counter(e.kind for e in events)
    details = Counter(e.detail for e in events if e.kind == EventKind.bounced)
    expected = {
        EventKind.delivered: DEFAULT_RATES["email.delivered"],
        EventKind.opened: DEFAULT_RATES["email.opened"],
        EventKind.clicked: DEFAULT_RATES["email.clicked"],
        EventKind.replied: DEFAULT_RATES["email.replied"],
        EventKind.auto_replied: DEFAULT_RATES["email.auto_replied"],
        EventKind.unsubscribed: DEFAULT_RATES["email.unsubscribed"],
        EventKind.complained: DEFAULT_RATES["email.complained"],
        EventKind.meeting_booked: DEFAULT_RATES["email.replied"] * DEFAULT_RATES["email.meeting_booked_after_reply"],
    }
    for kind, p in expected.items():
        assert abs(kinds[kind] / n - p) <= tolerance(p, n), (kind, kinds[kind] / n, p)
    for detail in ("hard", "soft"):
        p = DEFAULT_RATES[f"email.bounced_{detail}"]
        assert abs(details[detail] / n - p) <= tolerance(p, n), (detail, details[detail] / n, p)

    for got in by_touch.values():
        if EventKind.bounced in got:
            assert set(got) == {EventKind.bounced}  # a bounce excludes everything else
        for later in (EventKind.clicked, EventKind.replied):
            if later in got:
                assert EventKind.opened in got and got[EventKind.opened].occurred_at < got[later].occurred_at
        if EventKind.meeting_booked in got:
            assert got[EventKind.replied].occurred_at < got[EventKind.meeting_booked].occurred_at
        if EventKind.opened in got:
            assert got[EventKind.delivered].occurred_at < got[EventKind.opened].occurred_at


def test_linkedin_rates(tmp_path):
    n = 5000
    linkedin = make(SandboxLinkedIn, tmp_path)
    for action in ("visit", "invite", "message"):
        touches = [linkedin_touch(i, action) for i in range(n)]
        for start in range(0, n, 500):
            linkedin.send_batch(touches[start : start + 500], NOW)
    events = drain(linkedin)
    by_action = Counter((e.idempotency_key.split(":")[1], e.kind) for e in events)
    assert set(by_action) == {("invite", EventKind.accepted), ("message", EventKind.replied)}  # a visit gets nothing
    p = DEFAULT_RATES["linkedin.accepted"]
    assert abs(by_action["invite", EventKind.accepted] / n - p) <= tolerance(p, n)
    p = DEFAULT_RATES["linkedin.replied"]
    assert abs(by_action["message", EventKind.replied] / n - p) <= tolerance(p, n)
    assert all(e.channel == Channel.linkedin for e in events)


def test_every_call_gets_exactly_one_outcome_at_the_call_time(tmp_path):
    n = 5000
    call = make(SandboxCall, tmp_path)
    touches = [call_touch(i) for i in range(n)]
    for start in range(0, n, 500):
        call.send_batch(touches[start : start + 500], NOW)
    events = call.poll(NOW)  # outcomes are immediate: due at the call time itself
    events += drain(call, NOW)
    outcomes = {
        EventKind.call_connected: "connected",
        EventKind.call_voicemail: "voicemail",
        EventKind.call_no_answer: "no_answer",
        EventKind.call_wrong_number: "wrong_number",
    }
    per_touch = Counter(e.idempotency_key for e in events if e.kind in outcomes)
    assert len(per_touch) == n and set(per_touch.values()) == {1}
    assert all(e.occurred_at == NOW and e.detail == outcomes[e.kind] for e in events if e.kind in outcomes)
    kinds = Counter(e.kind for e in events)
    for kind, name in outcomes.items():
        p = DEFAULT_RATES[f"call.{name}"]
        assert abs(kinds[kind] / n - p) <= tolerance(p, n), (kind, kinds[kind] / n)
    connected = {e.idempotency_key for e in events if e.kind == EventKind.call_connected}
    meetings = {e.idempotency_key for e in events if e.kind == EventKind.meeting_booked}
    assert meetings <= connected
    p = DEFAULT_RATES["call.meeting_booked_after_connected"]
    assert abs(len(meetings) / len(connected) - p) <= tolerance(p, len(connected))
    disqualified = {e.idempotency_key for e in events if e.kind == EventKind.disqualified}
    assert disqualified <= connected and not disqualified & meetings
    p = DEFAULT_RATES["call.disqualified_after_connected"]
    assert abs(len(disqualified) / len(connected) - p) <= tolerance(p, len(connected))


def test_rate_overrides_change_only_their_own_decisions(tmp_path):
    base = make(SandboxEmail, tmp_path / "a", email_record="jsonl")
    more_replies = make(SandboxEmail, tmp_path / "b", email_record="jsonl", rates={"email.replied": 0.3})
    touches = [email_touch(i) for i in range(1000)]
    base.send_batch(touches, NOW)
    more_replies.send_batch(touches, NOW)
    a, b = drain(base), drain(more_replies)
    opened = lambda evs: {e.idempotency_key for e in evs if e.kind == EventKind.opened}  # noqa: E731
    replied = lambda evs: {e.idempotency_key for e in evs if e.kind == EventKind.replied}  # noqa: E731
    assert opened(a) == opened(b)
    assert replied(a) < replied(b)
    assert abs(len(replied(b)) / 1000 - 0.3) < 0.06


# ----------------------------------------------------------------------------- polling


def test_poll_returns_each_response_once_and_only_when_due(tmp_path):
    email = make(SandboxEmail, tmp_path, jitter=0, email_record="jsonl")
    email.send_batch([email_touch(i) for i in range(400)], NOW)
    assert email.poll(NOW) == []
    assert email.poll(NOW + timedelta(seconds=35)) == []

    seen: list[InboundEvent] = []
    previous = NOW
    for hours in (0.01, 1, 3.5, 10, 21, 30):
        horizon = NOW + timedelta(hours=hours)
        got = drain(email, horizon)
        assert all(previous < e.occurred_at <= horizon for e in got)  # due now, and not handed over before
        assert [e.occurred_at for e in got] == sorted(e.occurred_at for e in got)  # oldest first
        seen.extend(got)
        previous = horizon
        if hours == 0.01:
            assert {e.kind for e in got} == {EventKind.delivered}
        if hours == 1:
            assert {e.kind for e in got} <= {EventKind.bounced, EventKind.auto_replied}
    assert drain(email) == []
    assert len({e.dedupe_key for e in seen}) == len(seen)
    assert len(seen) == rows(tmp_path, "SELECT count(*) FROM responses")[0][0]


def test_responses_are_drawn_when_first_polled_once_whoever_polls(tmp_path):
    """A send only records the message, as at a real provider; the first poll, from any process
    sharing the outbox, draws its responses, and no later poll draws them again."""
    email = make(SandboxEmail, tmp_path, email_record="jsonl")
    email.send_batch([email_touch(i) for i in range(300)], NOW)
    assert rows(tmp_path, "SELECT count(*) FROM responses") == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM accepted WHERE drawn = 0") == [(300,)]

    other = make(SandboxEmail, tmp_path, email_record="jsonl")  # another worker, same outbox
    assert other.poll(NOW) == []  # nothing due at the send time itself
    scheduled = rows(tmp_path, "SELECT count(*) FROM responses")[0][0]
    assert scheduled > 300 and rows(tmp_path, "SELECT count(*) FROM accepted WHERE drawn = 0") == [(0,)]
    email.poll(NOW)
    assert rows(tmp_path, "SELECT count(*) FROM responses")[0][0] == scheduled

    reference = tmp_path / "reference"
    reference.mkdir()
    alone = make(SandboxEmail, reference, email_record="jsonl")
    alone.send_batch([email_touch(i) for i in range(300)], NOW)
    assert _signature(drain(email)) == _signature(drain(alone))  # the same fates, whoever drew them


def test_an_outbox_from_before_lazy_drawing_is_upgraded_in_place(tmp_path):
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    with sqlite3.connect(outbox / "sandbox.db") as conn:
        conn.execute("CREATE TABLE accepted (key TEXT PRIMARY KEY, provider_message_id TEXT NOT NULL)")
        conn.execute("CREATE TABLE responses (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, due_at TEXT NOT NULL, event TEXT NOT NULL, delivered INTEGER NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO accepted VALUES ('old:intro', 'sandbox-old')")
    email = make(SandboxEmail, tmp_path, email_record="jsonl")
    (again,) = email.send_batch([email_touch(1, idempotency_key="old:intro")], NOW)
    assert again.provider_message_id == "sandbox-old"  # still answered, never re-sent
    email.send_batch([email_touch(2)], NOW)
    drain(email)
    assert rows(tmp_path, "SELECT key, drawn FROM accepted ORDER BY key") == [("enr-2:intro:1", 1), ("old:intro", 1)]
    assert {json.loads(e)["idempotency_key"] for (e,) in rows(tmp_path, "SELECT event FROM responses")} <= {"enr-2:intro:1"}


def test_poll_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("connectors.sandbox._DRAW_CHUNK", 64)  # responses drawn over several transactions too
    email = make(SandboxEmail, tmp_path, poll_limit=100, email_record="jsonl")
    email.send_batch([email_touch(i) for i in range(500)], NOW)
    chunks = []
    while chunk := email.poll(FAR):
        chunks.append(chunk)
    total = rows(tmp_path, "SELECT count(*) FROM responses")[0][0]
    assert all(len(c) == 100 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 100
    flat = [e for c in chunks for e in c]
    assert len(flat) == total == len({e.dedupe_key for e in flat})
    assert [e.occurred_at for e in flat] == sorted(e.occurred_at for e in flat)


def test_each_channel_polls_only_its_own_responses(tmp_path):
    email, linkedin, call = make(SandboxEmail, tmp_path), make(SandboxLinkedIn, tmp_path), make(SandboxCall, tmp_path)
    email.send_batch([email_touch(i) for i in range(20)], NOW)
    linkedin.send_batch([linkedin_touch(i, "invite") for i in range(50)], NOW)
    call.send_batch([call_touch(i) for i in range(20)], NOW)
    assert {e.channel for e in drain(call)} == {Channel.call}
    assert {e.channel for e in drain(email)} == {Channel.email}
    assert {e.channel for e in drain(linkedin)} == {Channel.linkedin}


# --------------------------------------------------------------------- fault injection


def test_transient_fault_share_retry_after_and_recovery(tmp_path):
    n = 2000
    email = make(SandboxEmail, tmp_path, fail_rate=0.2, retry_after_seconds=30, email_record="jsonl")
    touches = [email_touch(i) for i in range(n)]
    results = [r for start in range(0, n, 500) for r in email.send_batch(touches[start : start + 500], NOW)]
    failed = [r for r in results if r.error is not None]
    assert abs(len(failed) / n - 0.2) <= tolerance(0.2, n)
    assert all(isinstance(r.error, TransientError) and r.error.retry_after == 30 for r in failed)
    assert all(r.provider_message_id is None for r in failed)
    accepted = rows(tmp_path, "SELECT count(*) FROM accepted")[0][0]
    assert accepted == n - len(failed)
    failed_keys = {r.touch_id for r in failed}
    assert not {e.touch_id for e in drain(email)} & failed_keys  # nothing simulated for a failed send

    retry = [t for t in touches if t.touch_id in failed_keys]
    again = email.send_batch(retry, NOW + timedelta(seconds=30))
    recovered = [r for r in again if r.error is None]
    assert abs(len(recovered) / len(retry) - 0.8) <= tolerance(0.8, len(retry))


def test_fault_injection_is_deterministic(tmp_path):
    def failures(root: Path) -> set[int]:
        sandbox = make(SandboxCall, root, fail_rate=0.3)
        return {r.touch_id for r in sandbox.send_batch([call_touch(i) for i in range(300)], NOW) if r.error}

    assert failures(tmp_path / "a") == failures(tmp_path / "b")


def test_terminal_faults_stay_rejected(tmp_path):
    linkedin = make(SandboxLinkedIn, tmp_path, fail_rate=0.25, fail_kind="terminal")
    touches = [linkedin_touch(i, "invite") for i in range(400)]
    first = {r.touch_id: r for r in linkedin.send_batch(touches, NOW)}
    rejected = {tid for tid, r in first.items() if r.error}
    assert abs(len(rejected) / 400 - 0.25) <= tolerance(0.25, 400)
    assert all(isinstance(first[tid].error, TerminalError) for tid in rejected)
    again = linkedin.send_batch([t for t in touches if t.touch_id in rejected], NOW)
    assert all(isinstance(r.error, TerminalError) for r in again)


# --------------------------------------------------------------------------- webhooks


def _webhook_body(**overrides) -> bytes:
    item = {
        "id": "evt-0001",
        "kind": "replied",
        "touch_id": 10_001,
        "idempotency_key": "enr-1:intro:1",
        "recipient": "francois.1@brasserie-faubourg.example",
        "occurred_at": "2026-03-03T10:15:00+01:00",
    }
    item.update(overrides)
    return json.dumps({"events": [item]}, ensure_ascii=False).encode("utf-8")


def test_signed_webhook_becomes_events(tmp_path):
    email = make(SandboxEmail, tmp_path)
    body = _webhook_body()
    (event,) = email.parse_webhook({"x-sandbox-signature": sign_webhook(body)}, body)
    assert event.kind == EventKind.replied and event.channel == Channel.email
    assert event.touch_id == 10_001 and event.idempotency_key == "enr-1:intro:1"
    assert event.recipient == "francois.1@brasserie-faubourg.example"
    assert event.occurred_at == datetime(2026, 3, 3, 9, 15, tzinfo=timezone.utc)
    assert event.dedupe_key == "sandbox:webhook:evt-0001"
    # The header name is case-insensitive, and a custom secret is honoured.
    custom = make(SandboxEmail, tmp_path, webhook_secret="s3cr3t-partagé")
    assert custom.parse_webhook({"X-Sandbox-Signature": sign_webhook(body, "s3cr3t-partagé")}, body)[0] == event


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Sandbox-Signature": ""},
        {"X-Sandbox-Signature": "0" * 64},
        {"X-Sandbox-Signature": sign_webhook(_webhook_body(), "wrong-secret")},
        {"X-Sandbox-Signature": sign_webhook(_webhook_body(kind="opened"))},  # signed another body
        {"X-Sandbox-Signature": "signé-à-la-main"},
    ],
)
def test_forged_or_missing_signature_is_rejected(tmp_path, headers):
    with pytest.raises(Unauthenticated, match="signature|Signature"):
        make(SandboxEmail, tmp_path).parse_webhook(headers, _webhook_body())


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[]", "events"),
        (b'{"events": {}}', "events"),
        (b'{"events": ["replied"]}', "not an object"),
        (_webhook_body(kind="teleported"), "unknown kind 'teleported'"),
        (_webhook_body(id=None), "no id"),
        (_webhook_body(occurred_at="mardi dernier"), "occurred_at"),
        (_webhook_body(touch_id="12"), "touch_id"),
        (_webhook_body(recipient=["a@b.example"]), "recipient"),
    ],
)
def test_malformed_signed_webhook_is_rejected_with_a_reason(tmp_path, body, reason):
    with pytest.raises(TerminalError, match=reason):
        make(SandboxEmail, tmp_path).parse_webhook({"X-Sandbox-Signature": sign_webhook(body)}, body)


# ---------------------------------------------------------------------------- settings


def test_settings_merge_overrides_into_defaults():
    s = SandboxSettings(rates={"email.opened": 0.6}, delays_hours={"email.replied": 2})
    assert s.rates["email.opened"] == 0.6 and s.rates["email.replied"] == DEFAULT_RATES["email.replied"]
    assert s.delays_hours["email.replied"] == 2 and s.delays_hours["linkedin.accepted"] == 30


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rates": {"email.openned": 0.5}}, "unknown rate 'email.openned'"),
        ({"rates": {"email.opened": 1.5}}, "between 0 and 1"),
        ({"rates": {"email.clicked": 0.5}}, "cannot exceed email.opened"),
        ({"rates": {"email.delivered": 0.99}}, "cannot exceed 1 - bounces"),
        ({"rates": {f"call.{o}": 0 for o in ("connected", "voicemail", "no_answer", "wrong_number")}}, "call outcome"),
        ({"delays_hours": {"email.opened": -1}}, "negative"),
        ({"fail_rate": 1.5}, "fail_rate"),
        ({"fail_kind": "terminal", "retry_after_seconds": 10}, "transient only"),
        ({"outbx": "typo"}, "outbx"),
    ],
)
def test_settings_errors_are_clear(settings, message):
    with pytest.raises(ValidationError, match=message):
        SandboxSettings(**settings)


def test_two_workers_opening_a_new_outbox_at_once_both_get_it(tmp_path: Path):
    """Switching a new SQLite file to WAL takes a lock SQLite does not wait for: the second
    opener used to fail with "database is locked" (and its whole batch went to retry)."""
    import threading

    for trial in range(10):
        outbox = tmp_path / f"outbox-{trial}"
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def open_it() -> None:
            connector = SandboxEmail({"outbox": str(outbox)})
            start.wait(timeout=30)
            try:
                with connector._transaction() as conn:
                    conn.execute("SELECT count(*) FROM accepted")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                connector.close()

        threads = [threading.Thread(target=open_it) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_the_channels_of_one_outbox_share_one_lock_in_a_process(tmp_path: Path):
    """Their sends run side by side (on PostgreSQL): they queue on a Python lock, handed over
    at once, not on SQLite's busy handler, which sleeps in steps of up to 100 ms."""
    from connectors.sandbox import SandboxLinkedIn

    email = SandboxEmail({"outbox": str(tmp_path / "outbox")})
    linkedin = SandboxLinkedIn({"outbox": str(tmp_path / "outbox")})
    other = SandboxEmail({"outbox": str(tmp_path / "elsewhere")})
    assert email._lock is linkedin._lock and email._lock is not other._lock

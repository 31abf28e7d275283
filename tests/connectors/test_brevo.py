"""Brevo, against a local server that implements its documented v3 shape (brevo_server.py):
the request each touch becomes, idempotent retries, 429/5xx/4xx, then the engine sending
through it while it rate-limits, and its webhooks arriving at the project's own web app."""

from __future__ import annotations

import base64
import json
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.utils import format_datetime
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from connectors.brevo import BrevoEmail, BrevoSettings, brevo_idempotency_key, parse_retry_after
from relance.channels import InboundEvent, OutboundTouch, Sender
from relance.dispatch import Dispatcher
from relance.email_message import make_message_id
from relance.errors import TerminalError, TransientError, Unauthenticated
from relance.events import Channel, EventKind
from relance.store import enrollments, events, suppressions, touches
from relance.web import create_app
from relance.workspace import Workspace
from tests.conftest import database_url
from tests.connectors.brevo_server import (
    API_KEY,
    EXAMPLE_KEY_ENV as KEY_ENV,
    EXAMPLE_SECRET as TOKEN,
    EXAMPLE_SECRET_ENV as SECRET_ENV,
    FakeBrevo,
    running,
    serve_asgi,
)
from tests.faults import START, enroll_many, enrollment_rows, fault_workspace, touch_rows

NOW = datetime(2026, 3, 3, 9, 45, tzinfo=UTC)
LEA = Sender("lea.martin@acme-finance.example", "Léa Martin", "Léa Martin\nAcme Finance")
PEOPLE = [
    ("Zoé Bouchard", "zoe.bouchard@sge-equipement.example"),
    ("Dubœuf, Jérôme", "j.duboeuf@vignobles-duboeuf.example"),  # non-ASCII and a comma: Brevo's bug
    ("Anaïs N'Guessan", "anais@ebene.example"),
]


@pytest.fixture
def fake():
    with running() as server:
        yield server


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    monkeypatch.setenv(SECRET_ENV, TOKEN)


def connector(fake: FakeBrevo, **settings) -> BrevoEmail:
    base = {"base_url": fake.url, "api_key_env": KEY_ENV, "webhook_secret_env": SECRET_ENV, "timeout_seconds": 5.0}
    return BrevoEmail(BrevoSettings.model_validate({**base, **settings}))


def touch(i: int, **overrides) -> OutboundTouch:
    name, address = PEOPLE[i % len(PEOPLE)]
    key = f"{100 + i}:intro"
    values = dict(
        touch_id=500 + i,
        idempotency_key=key,
        channel=Channel.email,
        action="send",
        recipient=address,
        recipient_name=name,
        sender=LEA,
        subject=f"{name.split()[0]}, une question rapide",
        body=f"Bonjour,\n\nÇa vous dirait d'échanger 15 minutes ?\n\nLéa\n",
        message_id=make_message_id(LEA.address, key),
        unsubscribe_url=f"https://links.acme-finance.example/u/{i}.tok",
        unsubscribe_mailto=f"mailto:{LEA.address}?subject=unsubscribe",
        metadata={"sequence": "cfo-outbound-fr", "step_id": "intro", "variant": "a"},
    )
    values.update(overrides)
    return OutboundTouch(**values)


# ----------------------------------------------------------------------------- sending


def test_each_touch_becomes_one_documented_request_on_one_reused_connection(fake, env):
    brevo = connector(fake)
    intro = touch(0)
    follow_up = touch(1, idempotency_key="101:bump", message_id=make_message_id(LEA.address, "101:bump"),
                      in_reply_to=make_message_id(LEA.address, "101:intro"), subject="Re: Jérôme, une question rapide",
                      metadata={"sequence": "cfo-outbound-fr", "step_id": "bump", "html": "<p>Bonjour</p>"})
    third = touch(2)
    results = brevo.send_batch([intro, follow_up, third], NOW)
    brevo.close()

    assert [r.error for r in results] == [None, None, None]
    assert [r.provider_message_id for r in results] == [m["messageId"] for m in fake.messages]
    assert all(r.provider_message_id.endswith("@smtp-relay.mailin.fr>") for r in results)
    assert len({r.client_port for r in fake.requests}) == 1, "one connection for the whole batch"
    for request in fake.requests:
        assert request.http_headers["api-key"] == API_KEY
        assert request.http_headers["content-type"] == "application/json"

    body = fake.messages[0]["body"]
    assert body["sender"] == {"email": LEA.address, "name": "Léa Martin"}
    assert body["to"] == [{"email": "zoe.bouchard@sge-equipement.example", "name": "Zoé Bouchard"}]
    assert body["subject"] == "Zoé, une question rapide"
    assert body["textContent"] == intro.body and "htmlContent" not in body  # plain text first, and only
    assert body["tags"] == ["relance", "sequence:cfo-outbound-fr", "step:intro", "variant:a"]
    headers = body["headers"]
    assert uuid.UUID(headers["idempotencyKey"]).version == 5
    assert headers["idempotencyKey"] == brevo_idempotency_key(intro)
    assert headers["Message-Id"] == intro.message_id
    assert "In-Reply-To" not in headers and "References" not in headers
    assert headers["List-Unsubscribe"] == (
        "<https://links.acme-finance.example/u/0.tok>, <mailto:lea.martin@acme-finance.example?subject=unsubscribe>"
    )
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert headers["X-Relance-Touch"] == "100:intro"
    assert json.loads(headers["X-Mailin-custom"]) == {"relance_key": "100:intro"}
    assert all(v.isascii() for v in headers.values()), "Brevo sends non-ASCII header values as raw 8-bit"

    threaded = fake.messages[1]["body"]
    assert threaded["headers"]["In-Reply-To"] == follow_up.in_reply_to
    assert threaded["headers"]["References"] == follow_up.in_reply_to
    assert threaded["subject"] == "Re: Jérôme, une question rapide"
    assert threaded["htmlContent"] == "<p>Bonjour</p>" and threaded["textContent"] == follow_up.body
    assert threaded["tags"] == ["relance", "sequence:cfo-outbound-fr", "step:bump"]
    # A non-ASCII display name with a comma goes as an RFC 2047 word, which Brevo keeps.
    encoded = threaded["to"][0]["name"]
    assert encoded.startswith("=?utf-8?") and str(make_header(decode_header(encoded))) == "Dubœuf, Jérôme"
    assert fake.messages[2]["body"]["to"][0]["name"] == "Anaïs N'Guessan"


def test_threading_headers_can_be_left_to_brevo(fake, env):
    brevo = connector(fake, threading_headers=False)
    [result] = brevo.send_batch([touch(1, in_reply_to=make_message_id(LEA.address, "101:intro"))], NOW)
    headers = fake.messages[0]["body"]["headers"]
    assert result.error is None and not {"Message-Id", "In-Reply-To", "References"} & set(headers)
    assert {"idempotencyKey", "List-Unsubscribe", "List-Unsubscribe-Post", "X-Mailin-custom"} <= set(headers)
    brevo.close()


def test_the_idempotency_key_is_stable_per_touch_and_distinct_across_touches_and_accounts():
    a = touch(0)
    assert brevo_idempotency_key(a) == brevo_idempotency_key(touch(0, subject="edited", body="edited"))
    assert brevo_idempotency_key(a) != brevo_idempotency_key(touch(0, idempotency_key="100:bump"))
    # Same enrollment id and step in another workspace, to another person: another key.
    assert brevo_idempotency_key(a) != brevo_idempotency_key(touch(0, recipient="someone@else.example"))
    assert brevo_idempotency_key(a) != brevo_idempotency_key(touch(0, sender=Sender("x@other.example", "X")))


def test_a_resend_is_deduplicated_by_brevo_and_returns_the_first_message_id(fake, env):
    brevo = connector(fake)
    batch = [touch(i) for i in range(3)]
    first = brevo.send_batch(batch, NOW)
    again = brevo.send_batch(batch, NOW + timedelta(minutes=2))
    assert [r.provider_message_id for r in again] == [r.provider_message_id for r in first]
    assert fake.sends_per_touch() == {"100:intro": 1, "101:intro": 1, "102:intro": 1}
    assert [r.duplicate for r in fake.requests] == [False] * 3 + [True] * 3
    brevo.close()


def test_an_accepted_send_whose_answer_is_lost_is_retried_without_a_second_email(fake, env):
    brevo = connector(fake)
    fake.fail_next(1, 502, accept=True)  # Brevo took it, the gateway lost the answer
    [lost] = brevo.send_batch([touch(0)], NOW)
    assert isinstance(lost.error, TransientError) and "502" in str(lost.error)
    [retried] = brevo.send_batch([touch(0)], NOW + timedelta(minutes=1))
    assert retried.error is None and retried.provider_message_id == fake.messages[0]["messageId"]
    assert fake.sends_per_touch() == {"100:intro": 1}
    brevo.close()


def test_a_timeout_is_transient_and_the_retry_is_not_a_duplicate(fake, env):
    brevo = connector(fake, timeout_seconds=0.3)
    fake.fail_next(1, 201, accept=True, delay=1.0)  # accepted, but slower than our patience
    [slow, other] = brevo.send_batch([touch(0), touch(1)], NOW)
    assert isinstance(slow.error, TransientError) and "timed out" in str(slow.error)
    assert other.error is None, "a slow answer does not stop the rest of the batch"
    [retried] = brevo.send_batch([touch(0)], NOW + timedelta(minutes=1))
    assert retried.error is None
    assert fake.sends_per_touch() == {"100:intro": 1, "101:intro": 1}
    brevo.close()


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("120", 120.0), ("http-date", 90.0), (None, 1.0)],  # None: Brevo's x-sib-ratelimit-reset
    ids=["seconds", "http-date", "x-sib-ratelimit-reset"],
)
def test_429_is_transient_with_its_retry_after_and_holds_the_rest_of_the_batch(fake, env, retry_after, expected):
    if retry_after == "http-date":
        retry_after = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    fake.fail_next(1, 429, retry_after=retry_after)
    brevo = connector(fake)
    results = brevo.send_batch([touch(i) for i in range(3)], NOW)
    assert all(isinstance(r.error, TransientError) for r in results)
    assert all(r.error.retry_after == pytest.approx(expected, abs=2) for r in results)
    assert "429" in str(results[0].error) and "too_many_requests" in str(results[0].error)
    assert len(fake.requests) == 1 and not fake.messages, "after a 429 the rest of the batch waits"
    brevo.close()


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_5xx_is_transient_for_that_touch_only(fake, env, status):
    fake.fail_next(1, status, retry_after="30" if status == 503 else None)
    brevo = connector(fake)
    first, second = brevo.send_batch([touch(0), touch(1)], NOW)
    assert isinstance(first.error, TransientError) and str(status) in str(first.error)
    assert first.error.retry_after == (30.0 if status == 503 else None)
    assert second.error is None and fake.sends_per_touch() == {"101:intro": 1}
    brevo.close()


def test_400_is_terminal_with_brevos_code_and_message(fake, env):
    fake.fail_recipient("anais@ebene.example", 400, code="invalid_parameter", message="email is not valid in to")
    brevo = connector(fake)
    ok, ok2, rejected = brevo.send_batch([touch(0), touch(1), touch(2)], NOW)
    assert ok.error is None and ok2.error is None
    assert isinstance(rejected.error, TerminalError) and not isinstance(rejected.error, TransientError)
    assert str(rejected.error) == "brevo: 400 invalid_parameter: email is not valid in to (to anais@ebene.example)"
    brevo.close()


@pytest.mark.parametrize("status", [403, 404])
def test_other_4xx_are_terminal(fake, env, status):
    fake.fail_next(1, status, message="sender not validated")
    [result] = connector(fake).send_batch([touch(0)], NOW)
    assert isinstance(result.error, TerminalError) and "sender not validated" in str(result.error)


def test_a_wrong_api_key_fails_the_batch_with_one_request(fake, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "xkeysib-wrong")
    results = connector(fake).send_batch([touch(i) for i in range(3)], NOW)
    assert all(isinstance(r.error, TerminalError) and "401 unauthorized: Key not found" in str(r.error) for r in results)
    assert len(fake.requests) == 1


def test_no_api_key_in_the_environment_sends_nothing(fake, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    results = connector(fake).send_batch([touch(0)], NOW)
    assert isinstance(results[0].error, TerminalError) and KEY_ENV in str(results[0].error)
    assert not fake.requests


def test_an_unreachable_api_is_transient(env):
    with running() as gone:
        url = gone.url
    brevo = BrevoEmail(BrevoSettings(base_url=url, api_key_env=KEY_ENV, timeout_seconds=2))
    results = brevo.send_batch([touch(0), touch(1)], NOW)
    assert all(isinstance(r.error, TransientError) and "cannot reach" in str(r.error) for r in results)


def test_a_touch_no_provider_would_take_fails_alone_before_any_request(fake, env):
    bad = touch(0, recipient="not an address")
    hostile = touch(1, recipient_name="Evil\r\nBcc: victim@example.com")
    results = connector(fake).send_batch([bad, hostile, touch(2)], NOW)
    assert isinstance(results[0].error, TerminalError) and "not an email address" in str(results[0].error)
    assert results[1].error is None and results[2].error is None
    assert len(fake.requests) == 2  # the fake refuses any header or name with a line break
    assert fake.messages[0]["body"]["to"][0]["name"] == "Evil Bcc: victim@example.com"


def test_retry_after_parsing():
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": " 2.5 "}) == 2.5
    base = datetime(2026, 3, 3, 9, 0, tzinfo=UTC)
    later = format_datetime(base + timedelta(minutes=5), usegmt=True)
    assert parse_retry_after({"Retry-After": later}, wall_now=base) == 300.0
    assert parse_retry_after({"Retry-After": later, "Date": format_datetime(base, usegmt=True)}) == 300.0
    past = format_datetime(base - timedelta(minutes=5), usegmt=True)
    assert parse_retry_after({"Retry-After": past}, wall_now=base) == 0.0
    assert parse_retry_after({"Retry-After": "soon", "x-sib-ratelimit-reset": "12"}) == 12.0
    assert parse_retry_after({"Retry-After": "-3"}) is None
    assert parse_retry_after({"Retry-After": "inf"}) is None
    assert parse_retry_after({"Retry-After": "1e12"}) == 86_400.0
    assert parse_retry_after({}) is None


# ---------------------------------------------------------------------------- webhooks


def brevo_event(event: str, **fields) -> dict:
    base = {
        "event": event, "email": "zoe.bouchard@sge-equipement.example", "id": 4242,
        "date": "2026-03-03 10:46:00", "ts": 1772531160, "ts_event": 1772531160, "ts_epoch": 1772531160123,
        "message-id": "<202603030945.00000000001@smtp-relay.mailin.fr>", "subject": "Zoé, une question rapide",
        "X-Mailin-custom": '{"relance_key":"100:intro"}', "tags": ["relance", "step:intro"],
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("event", "kind", "detail"),
    [
        ("request", EventKind.queued, None),
        ("delivered", EventKind.delivered, None),
        ("unique_opened", EventKind.opened, "first"),
        ("opened", EventKind.opened, None),
        ("proxy_open", EventKind.opened, "proxy"),
        ("click", EventKind.clicked, None),
        ("soft_bounce", EventKind.bounced, "soft"),
        ("deferred", EventKind.bounced, "soft"),
        ("hard_bounce", EventKind.bounced, "hard"),
        ("invalid_email", EventKind.bounced, "hard"),
        ("blocked", EventKind.bounced, "hard"),
        ("spam", EventKind.complained, None),
        ("complaint", EventKind.complained, None),
        ("unsubscribed", EventKind.unsubscribed, None),
        ("unsubscribe", EventKind.unsubscribed, None),
        ("error", EventKind.failed, "provider error"),
    ],
)
def test_each_brevo_event_is_normalised(env, event, kind, detail):
    extra = {"reason": " RecipientError: 550 5.1.1 mailbox unavailable"} if kind == EventKind.bounced else {}
    if event == "click":
        extra["link"] = "https://acme-finance.example/cas-client"
    [parsed] = BrevoEmail(BrevoSettings(webhook_secret_env=SECRET_ENV)).parse_webhook(
        bearer(), json.dumps(brevo_event(event, **extra)).encode()
    )
    assert isinstance(parsed, InboundEvent)
    assert (parsed.kind, parsed.channel) == (kind, Channel.email)
    assert parsed.occurred_at == datetime(2026, 3, 3, 9, 46, 0, 123000, tzinfo=UTC)  # ts_epoch, UTC ms
    assert parsed.provider_message_id == "<202603030945.00000000001@smtp-relay.mailin.fr>"
    assert parsed.message_id == parsed.provider_message_id
    assert parsed.idempotency_key == "100:intro" and parsed.recipient == "zoe.bouchard@sge-equipement.example"
    assert parsed.payload["event"] == event and parsed.payload["tags"] == ["relance", "step:intro"]
    if kind == EventKind.bounced:
        assert parsed.detail == detail and parsed.payload["reason"] == "RecipientError: 550 5.1.1 mailbox unavailable"
    else:
        assert parsed.detail == detail
    if event == "click":
        assert parsed.payload["link"] == "https://acme-finance.example/cas-client"
    assert parsed.dedupe_key.startswith(f"brevo:{event}:")


def test_batched_events_the_same_event_twice_and_untracked_events():
    brevo = BrevoEmail(BrevoSettings(webhook_secret_env=SECRET_ENV))
    batch = [
        brevo_event("delivered"),
        brevo_event("delivered"),  # Brevo retrying: same dedupe key
        brevo_event("unique_opened", ts_epoch=1772534760000),
        brevo_event("opened", ts_epoch=1772538360000),  # a second open is its own event
        brevo_event("list_addition"),  # documented, says nothing about a message
        brevo_event("some_future_event"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_ENV, TOKEN)
        parsed = brevo.parse_webhook(bearer(), json.dumps(batch).encode())
    assert [e.kind for e in parsed] == [EventKind.delivered, EventKind.delivered, EventKind.opened, EventKind.opened]
    assert parsed[0].dedupe_key == parsed[1].dedupe_key
    assert len({e.dedupe_key for e in parsed}) == 3


def test_timestamps_fall_back_to_ts_event_then_brevos_paris_date(env):
    brevo = BrevoEmail(BrevoSettings(webhook_secret_env=SECRET_ENV))
    [a] = brevo.parse_webhook(bearer(), json.dumps(brevo_event("delivered", ts_epoch=None)).encode())
    assert a.occurred_at == datetime.fromtimestamp(1772531160, UTC)
    summer = brevo_event("delivered", ts_epoch=None, ts_event=None, ts=None, date="2026-07-01 10:00:00")
    [b] = brevo.parse_webhook(bearer(), json.dumps(summer).encode())
    assert b.occurred_at == datetime(2026, 7, 1, 8, 0, tzinfo=UTC)  # CEST is UTC+2


def test_an_unbracketed_message_id_and_a_foreign_x_mailin_custom(env):
    brevo = BrevoEmail(BrevoSettings(webhook_secret_env=SECRET_ENV))
    raw = brevo_event("delivered", **{"message-id": "201798300811.5787683@relay.domain.com", "X-Mailin-custom": '{"meta": "data"}'})
    [e] = brevo.parse_webhook(bearer(), json.dumps(raw).encode())
    assert e.provider_message_id == "201798300811.5787683@relay.domain.com"
    assert e.message_id == "<201798300811.5787683@relay.domain.com>" and e.idempotency_key is None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},
        {"Authorization": "Basic " + base64.b64encode(TOKEN.encode()).decode()},
        {"X-Sandbox-Signature": "deadbeef"},
    ],
    ids=["none", "wrong", "longer", "no-scheme", "basic-instead", "other-header"],
)
def test_forged_calls_are_terminal_errors(env, headers):
    body = json.dumps(brevo_event("hard_bounce")).encode()
    with pytest.raises(Unauthenticated, match="brevo webhook"):
        BrevoEmail(BrevoSettings(webhook_secret_env=SECRET_ENV)).parse_webhook(headers, body)


def test_no_configured_secret_refuses_every_call(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(TerminalError, match="is not set"):
        BrevoEmail(BrevoSettings(webhook_secret_env=SECRET_ENV)).parse_webhook(bearer(), json.dumps(brevo_event("spam")).encode())


def test_basic_auth_from_the_notify_url(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "relance:s3cr3t")
    brevo = BrevoEmail(BrevoSettings(webhook_auth="basic", webhook_secret_env=SECRET_ENV))
    body = json.dumps(brevo_event("spam")).encode()
    good = "Basic " + base64.b64encode(b"relance:s3cr3t").decode()
    assert [e.kind for e in brevo.parse_webhook({"authorization": good}, body)] == [EventKind.complained]
    for forged in ("Basic " + base64.b64encode(b"relance:guess").decode(), "Basic !!!notbase64", f"Bearer {TOKEN}", ""):
        with pytest.raises(TerminalError):
            brevo.parse_webhook({"Authorization": forged}, body)


MALFORMED = [
    b"", b"\x00\xff\xfe garbage", b"not json", b"{}", b"[]", b"null", b"42", b'"delivered"', b"[1, 2]",
    b'{"items": []}', b"[" * 100_000 + b"]" * 100_000,
    json.dumps({"email": "a@b.example", "ts_epoch": 1772531160000}).encode(),  # no event name
    json.dumps({**brevo_event("delivered"), "event": 42}).encode(),
    json.dumps(brevo_event("delivered", email=["a@b.example"])).encode(),
    json.dumps(brevo_event("delivered", **{"message-id": 7})).encode(),
    json.dumps(brevo_event("delivered", email=None, **{"message-id": None})).encode(),
    json.dumps(brevo_event("delivered", ts_epoch="yesterday")).encode(),
    json.dumps(brevo_event("delivered", ts_epoch=True)).encode(),
    json.dumps(brevo_event("delivered", ts_epoch=10**30)).encode(),
    json.dumps(brevo_event("delivered", ts_epoch=None, ts_event=None, ts=None, date=None)).encode(),
    json.dumps(brevo_event("delivered", ts_epoch=None, ts_event=None, ts=None, date="3 mars")).encode(),
    json.dumps(brevo_event("hard_bounce", reason={"smtp": 550})).encode(),
    json.dumps(brevo_event("delivered", tags="relance")).encode(),
    json.dumps(brevo_event("hard bounce!")).encode(),
    json.dumps([brevo_event("delivered"), "oops"]).encode(),
    b'{"event": "delivered", "ts_epoch": NaN, "email": "a@b.example"}',
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_authenticated_bodies_are_terminal_errors_never_another_exception(env, body):
    with pytest.raises(TerminalError):
        BrevoEmail(BrevoSettings(webhook_secret_env=SECRET_ENV)).parse_webhook(bearer(), body)


# ------------------------------------------------------------------- through the engine

ENROLLMENTS = 30  # three batches of 10


def brevo_workspace(root: Path, database: str, fake: FakeBrevo, *, auth: str = "bearer", max_attempts: int = 10) -> Workspace:
    """The fault-injection workspace (every intro due at START), its email sent through Brevo."""
    fault_workspace(root, database, batch=10, max_attempts=max_attempts)
    config = root / "config.yaml"
    lines = config.read_text().splitlines()
    [i] = [n for n, line in enumerate(lines) if line.startswith("  email: {use: sandbox")]
    lines[i] = (
        f"  email: {{use: brevo, settings: {{base_url: '{fake.url}', api_key_env: {KEY_ENV},"
        f" webhook_auth: {auth}, webhook_secret_env: {SECRET_ENV}, timeout_seconds: 5}}}}"
    )
    config.write_text("\n".join(lines) + "\n")
    ws = Workspace.load(root)
    assert type(ws.connector(Channel.email)) is BrevoEmail
    return ws


def backoff(attempts: int, retry_after: float | None) -> timedelta:
    return timedelta(seconds=max(retry_after or 0.0, 60.0 * 2 ** (attempts - 1)))


def test_the_engine_sends_everything_once_through_a_rate_limiting_brevo(backend, tmp_path, fake, env):
    """Every third call gets a 429 with Retry-After: 900 (and the rest of its batch waits):
    dispatch on a clock that jumps to the next due time until every intro is out."""
    fake.fail_every(3, 429, retry_after="900")
    ws = brevo_workspace(tmp_path / "ws", database_url(backend, tmp_path), fake)
    enroll_many(ws, ENROLLMENTS)
    attempted_at: dict[str, list[datetime]] = defaultdict(list)
    now = START
    for _ in range(40):
        before = {t.idempotency_key: t.attempts for t in touch_rows(ws)}
        Dispatcher(ws).run(now)
        due = {e.id: e.next_due_at for e in enrollment_rows(ws).values()}
        for t in touch_rows(ws, touches.c.step_id == "intro"):
            tried = t.attempts - before.get(t.idempotency_key, 0)
            assert tried in (0, 1)
            if tried:
                attempted_at[t.idempotency_key].append(now)
            if tried and t.status == "retry":
                assert t.error.startswith("brevo: 429 rate limited")
                assert due[t.enrollment_id] >= now + backoff(t.attempts, 900.0)
        pending = [e for e in enrollment_rows(ws).values() if e.next_step_id == "intro"]
        if not pending:
            break
        assert all(e.state == "active" for e in pending), "a 429 paused an enrollment"
        now = max(now + timedelta(seconds=1), min(e.next_due_at for e in pending))
    else:
        pytest.fail("intros still unsent after 40 dispatch runs")

    rows = touch_rows(ws, touches.c.step_id == "intro")
    assert len(rows) == ENROLLMENTS and {t.status for t in rows} == {"sent"}
    assert fake.sends_per_touch() == {t.idempotency_key: 1 for t in rows}, "each intro reached Brevo exactly once"
    assert {t.provider_message_id for t in rows} == {m["messageId"] for m in fake.messages}
    for t in rows:
        assert fake.message_for(t.idempotency_key)["messageId"] == t.provider_message_id
        assert fake.message_for(t.idempotency_key)["body"]["headers"]["Message-Id"] == t.message_id
    assert any(t.attempts > 1 for t in rows) and sum(r.status == 429 for r in fake.requests) >= 5
    # The engine never called back sooner than Retry-After, and never more than once per run.
    for key, times in attempted_at.items():
        for n, (earlier, later) in enumerate(pairwise(times), 1):
            assert later - earlier >= backoff(n, 900.0), (key, times)
    with ws.store.connect() as conn:
        sent_events = Counter(conn.scalars(select(events.c.touch_id).where(events.c.kind == "sent")))
    assert sent_events == {t.id: 1 for t in rows}
    ws.close()


def test_the_engine_retries_a_lost_answer_without_a_duplicate_and_stops_on_a_rejection(tmp_path, fake, env):
    ws = brevo_workspace(tmp_path / "ws", database_url("sqlite", tmp_path), fake)
    enroll_many(ws, 5)
    fake.fail_recipient("p1@client1.example", 500, times=1, accept=True)  # sent, but answered 500
    fake.fail_recipient("p3@client3.example", 400, code="invalid_parameter", message="email is not valid in to")
    first = Dispatcher(ws).run(START)
    assert first.sent == {"email": 3} and first.retried == {"email": 1} and first.failed == {"email": 1}
    Dispatcher(ws).run(START + timedelta(minutes=2))
    rows = {t.recipient: t for t in touch_rows(ws, touches.c.step_id == "intro")}
    assert rows["p1@client1.example"].status == "sent" and rows["p1@client1.example"].attempts == 2
    assert rows["p1@client1.example"].provider_message_id == fake.message_for(rows["p1@client1.example"].idempotency_key)["messageId"]
    rejected = rows["p3@client3.example"]
    assert rejected.status == "failed" and rejected.attempts == 1
    assert rejected.error == "TerminalError: brevo: 400 invalid_parameter: email is not valid in to (to p3@client3.example)"
    assert enrollment_rows(ws)[rejected.enrollment_id].state == "paused"
    assert fake.sends_per_touch() == {t.idempotency_key: 1 for t in rows.values() if t.status == "sent"}
    ws.close()


# ------------------------------------------------------------- webhooks, over real HTTP


def counts(ws: Workspace) -> tuple[int, int, list[str]]:
    with ws.store.connect() as conn:
        n_events = conn.scalar(select(func.count()).select_from(events))
        n_suppressed = conn.scalar(select(func.count()).select_from(suppressions))
        states = list(conn.scalars(select(enrollments.c.state).order_by(enrollments.c.id)))
    return n_events, n_suppressed, states


@pytest.fixture
def sent_through_brevo(tmp_path, fake, env):
    """Eight intros sent through the local Brevo, then the project's web app served by uvicorn."""
    ws = brevo_workspace(tmp_path / "ws", database_url("sqlite", tmp_path), fake)
    enroll_many(ws, 8)
    assert Dispatcher(ws).run(START).sent == {"email": 8}
    rows = {t.recipient: t for t in touch_rows(ws, touches.c.step_id == "intro")}
    with serve_asgi(create_app(ws, clock=lambda: START + timedelta(hours=1))) as url:
        yield ws, rows, url
    ws.close()


def test_brevo_webhooks_land_in_the_event_log_and_suppress_at_once(sent_through_brevo, fake):
    ws, rows, url = sent_through_brevo
    message = {address: fake.message_for(t.idempotency_key) for address, t in rows.items()}
    at = START + timedelta(minutes=30)
    p = [f"p{i}@client{i}.example" for i in range(8)]
    plan = [
        *(fake.webhook_event(message[a], "delivered", at=at) for a in p if a != p[1]),
        fake.webhook_event(message[p[0]], "unique_opened", at=at + timedelta(minutes=5)),
        fake.webhook_event(message[p[0]], "click", at=at + timedelta(minutes=6), link="https://acme.example/cas"),
        fake.webhook_event(message[p[1]], "hard_bounce", at=at, reason="550 5.1.1 user unknown"),
        fake.webhook_event(message[p[2]], "spam", at=at + timedelta(hours=2)),
        fake.webhook_event(message[p[3]], "unsubscribed", at=at + timedelta(hours=3)),
        fake.webhook_event(message[p[4]], "soft_bounce", at=at, reason="452 4.2.2 mailbox full"),
        fake.webhook_event(message[p[5]], "deferred", at=at, reason="421 try later"),
    ]
    # One call per event, as Brevo does by default.
    responses = fake.deliver(f"{url}/webhooks/email", plan, token=TOKEN)
    assert [r.status_code for r in responses] == [200] * len(plan), [r.text for r in responses if r.status_code != 200]
    assert sum(r.json()["unmatched"] for r in responses) == 0

    with ws.store.connect() as conn:
        got = conn.execute(
            select(events.c.kind, events.c.detail, events.c.touch_id, events.c.step_id, events.c.occurred_at)
            .where(events.c.dedupe_key.like("brevo:%"))
        ).all()
        suppressed = {
            r.value: r.reason
            for r in conn.execute(select(suppressions.c.value, suppressions.c.reason).where(suppressions.c.kind == "email"))
        }
    by_touch = defaultdict(list)
    for e in got:
        assert e.step_id == "intro"
        by_touch[e.touch_id].append((e.kind, e.detail))
    assert sorted(by_touch[rows[p[0]].id]) == [("clicked", None), ("delivered", None), ("opened", "first")]
    assert by_touch[rows[p[1]].id] == [("bounced", "hard")]
    assert sorted(by_touch[rows[p[2]].id]) == [("complained", None), ("delivered", None)]
    assert sorted(by_touch[rows[p[4]].id]) == [("bounced", "soft"), ("delivered", None)]
    assert sorted(by_touch[rows[p[5]].id]) == [("bounced", "soft"), ("delivered", None)]
    assert {e.occurred_at.replace(tzinfo=UTC) for e in got if e.kind == "complained"} == {at + timedelta(hours=2)}
    # A hard bounce, a complaint and an opt-out suppress at once; soft bounces and deferrals do not.
    assert set(suppressed) == {p[1], p[2], p[3]}
    assert suppressed[p[1]] == "hard bounce"
    states = {r.recipient: enrollment_rows(ws)[r.enrollment_id].state for r in rows.values()}
    assert {a for a, s in states.items() if s == "exited"} == {p[1], p[2], p[3]}

    # Brevo retrying the same calls, then batching them: nothing new.
    before = counts(ws)
    again = fake.deliver(f"{url}/webhooks/email", plan, token=TOKEN)
    batched = fake.deliver(f"{url}/webhooks/email", plan, batched=True, token=TOKEN)
    assert {r.status_code for r in again + batched} == {200}
    assert batched[0].json()["duplicates"] == len(plan) and batched[0].json()["recorded"] == 0
    assert counts(ws) == before


def test_events_match_by_our_message_id_or_our_key_when_brevos_id_is_unknown(sent_through_brevo, fake):
    ws, rows, url = sent_through_brevo
    t6, t7 = rows["p6@client6.example"], rows["p7@client7.example"]
    at = START + timedelta(minutes=40)
    # Brevo kept our Message-Id as the message's id, and no X-Mailin-custom came back:
    by_message_id = fake.webhook_event(fake.message_for(t6.idempotency_key), "hard_bounce", at=at, **{"message-id": t6.message_id})
    by_message_id.pop("X-Mailin-custom")
    # An id we never stored, but our key came back in X-Mailin-custom:
    by_key = fake.webhook_event(fake.message_for(t7.idempotency_key), "spam", at=at, **{"message-id": "<unknown@relay.example>"})
    [response] = fake.deliver(f"{url}/webhooks/email", [by_message_id, by_key], batched=True, token=TOKEN)
    assert response.status_code == 200 and response.json()["recorded"] == 2 and response.json()["unmatched"] == 0
    with ws.store.connect() as conn:
        matched = dict(conn.execute(select(events.c.kind, events.c.touch_id).where(events.c.dedupe_key.like("brevo:%"))).all())
    assert matched == {"bounced": t6.id, "complained": t7.id}


def test_forged_or_malformed_webhooks_get_4xx_and_change_nothing(sent_through_brevo, fake):
    ws, rows, url = sent_through_brevo
    hook = f"{url}/webhooks/email"
    good = fake.webhook_event(fake.message_for(rows["p0@client0.example"].idempotency_key), "hard_bounce", reason="550")
    before = counts(ws)
    forged = [
        fake.deliver(hook, [good], token="guessed")[0],
        fake.deliver(hook, [good])[0],  # no credentials at all
        fake.deliver(hook.replace("http://", "http://relance:guess@"), [good])[0],  # basic instead of bearer
    ]
    with httpx.Client(timeout=10) as client:
        auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
        malformed = [
            client.post(hook, content=b"\x00\xff not json", headers=auth),
            client.post(hook, content=b"{}", headers=auth),
            client.post(hook, content=json.dumps({**good, "ts_epoch": "soon"}).encode(), headers=auth),
            # One bad event spoils the call: the good one before it is not recorded either.
            client.post(hook, content=json.dumps([good, {**good, "email": 42}]).encode(), headers=auth),
        ]
    for response, status in [*((f, 401) for f in forged), *((m, 400) for m in malformed)]:
        assert response.status_code == status, (response.status_code, response.text)
        assert "brevo webhook" in response.json()["error"]
    assert counts(ws) == before


def test_basic_auth_webhooks_from_a_notify_url_with_credentials(tmp_path, fake, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    monkeypatch.setenv(SECRET_ENV, "relance:Zx9-long-secret")
    ws = brevo_workspace(tmp_path / "ws", database_url("sqlite", tmp_path), fake, auth="basic")
    enroll_many(ws, 1)
    Dispatcher(ws).run(START)
    [t] = touch_rows(ws, touches.c.step_id == "intro")
    with serve_asgi(create_app(ws, clock=lambda: START + timedelta(hours=1))) as url:
        notify = url.replace("http://", "http://relance:Zx9-long-secret@") + "/webhooks/email"
        event = fake.webhook_event(fake.message_for(t.idempotency_key), "unsubscribed")
        [ok] = fake.deliver(notify, [event])
        [forged] = fake.deliver(notify.replace("Zx9", "Zx8"), [event])
    assert ok.status_code == 200 and ok.json()["recorded"] == 1
    assert forged.status_code == 401
    with ws.store.connect() as conn:
        emails = list(conn.scalars(select(suppressions.c.value).where(suppressions.c.kind == "email")))
    assert emails == [t.recipient] and enrollment_rows(ws)[t.enrollment_id].state == "exited"
    ws.close()

"""The SMTP connector against a real local SMTP server (aiosmtpd): what arrives, over how many
connections, how every refusal maps to a typed error, DKIM, and threading through the engine."""

from __future__ import annotations

import base64
import re
import sys
import types
from datetime import datetime, timedelta, timezone
from email.header import decode_header, make_header
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError
from sqlalchemy import insert, select

from connectors.smtp import DeliveryUnknown, RecipientRefused, SmtpEmail, SmtpSettings
from relance.channels import Capability, InboundEvent, OutboundTouch, Sender
from relance.config import Config
from relance.dispatch import Dispatcher
from relance.email_message import make_message_id
from relance.enrollment import enroll
from relance.errors import TerminalError, TransientError
from relance.events import Channel, EventKind
from relance.store import enrollments, prospects
from relance.workspace import Workspace
from tests.conftest import at, write_workspace
from tests.connectors.smtp_server import PASSWORD, USERNAME, free_port, start_tls

NOW = datetime(2026, 3, 3, 9, 45, tzinfo=timezone.utc)
MARIE = Sender("marie.dupont@acme-finance.example", "Marie Dupont", "Marie Dupont\nAcme Finance")
LEA = Sender("lea.martin@acme-finance.example", "Léa Martin", "Léa Martin\nAcme Finance")
IDENTITY = "Acme Finance SAS, 12 rue de la Paix, 75002 Paris"
OPT_OUT = "Pour ne plus être contacté : https://links.acme-finance.example/u/tok.sig"
BODY = "Bonjour Zoé,\n\nÇa vous dirait d'échanger 15 minutes sur votre clôture ?\n\n{sig}\n{identity}\n{opt_out}\n"


def touch(i: int, recipient: str, *, sender: Sender = LEA, name: str = "Zoé Bouchard", subject: str = "Clôture mensuelle : une question, Zoé",
          in_reply_to: str | None = None, html: str | None = None) -> OutboundTouch:
    key = f"{100 + i}:intro" if in_reply_to is None else f"{100 + i}:bump"
    return OutboundTouch(
        touch_id=i,
        idempotency_key=key,
        channel=Channel.email,
        action="send",
        recipient=recipient,
        recipient_name=name,
        sender=sender,
        subject=subject,
        body=BODY.format(sig=sender.signature, identity=IDENTITY, opt_out=OPT_OUT),
        message_id=make_message_id(sender.address, key),
        in_reply_to=in_reply_to,
        references=(in_reply_to,) if in_reply_to else (),
        unsubscribe_url="https://links.acme-finance.example/u/tok.sig",
        unsubscribe_mailto=f"mailto:{sender.address}?subject=unsubscribe",
        metadata={"date": NOW, **({"html": html} if html else {})},
    )


def config(smtp: dict | None, *, lea_smtp: dict | None = None, imap: dict | None = None) -> Config:
    marie = {"email": MARIE.address, "name": MARIE.name, "signature": MARIE.signature}
    lea = {"email": LEA.address, "name": LEA.name, "signature": LEA.signature}
    if smtp is not None:
        marie["smtp"] = smtp
    if lea_smtp is not None:
        lea["smtp"] = lea_smtp
    if imap is not None:
        lea["imap"] = imap
    return Config.model_validate({"company": {"name": "Acme Finance SAS", "address": "12 rue de la Paix, 75002 Paris"}, "senders": {"sales": [marie, lea]}})


def connector(tmp_path: Path, cfg: Config, **settings) -> SmtpEmail:
    return SmtpEmail(SmtpSettings.model_validate({"helo_hostname": "relance.test", **settings}), workspace=SimpleNamespace(root=tmp_path, config=cfg))


def raw_header(data: bytes, name: str) -> str:
    """A header exactly as it travelled (unfolded), before any decoding."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    match = re.search(rf"^{name}:(.*(?:\r\n[ \t].*)*)", head, re.MULTILINE | re.IGNORECASE)
    assert match, f"no {name} header"
    return re.sub(r"\r\n[ \t]", " ", match.group(1)).strip()


@pytest.fixture
def server(smtp_server):
    return smtp_server


# ---------------------------------------------------------------- message hygiene
def test_what_arrives_carries_every_header_of_a_prospecting_email(server, tmp_path):
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()))
    first = touch(1, "zoe.bouchard@sge-equipement.example", html="<p>Bonjour Zoé,</p>")
    follow_up = touch(2, "f.lefevre@brasserie-faubourg.example", name="François Lefèvre", subject="Re: Votre clôture", in_reply_to=first.message_id)
    results = smtp.send_batch([first, follow_up], NOW)

    assert [r.error for r in results] == [None, None]
    assert [r.provider_message_id for r in results] == [first.message_id, follow_up.message_id]
    received = server.recorder.received
    assert [(r.mail_from, r.rcpt_tos) for r in received] == [
        (LEA.address, ["zoe.bouchard@sge-equipement.example"]),
        (LEA.address, ["f.lefevre@brasserie-faubourg.example"]),
    ]
    one, two = (r.message for r in received)
    # Message-ID on the sender's domain, and it is what the connector reports.
    assert one["Message-ID"] == first.message_id and one["Message-ID"].endswith("@acme-finance.example>")
    assert "In-Reply-To" not in one and "References" not in one
    assert two["In-Reply-To"] == first.message_id and two["References"] == first.message_id
    # RFC 2047 on the wire for the accented subject and display names; decoded intact.
    data = received[0].data
    assert data.isascii()
    for name in ("Subject", "From", "To"):
        assert "=?utf-8?" in raw_header(data, name).lower(), name
    assert one["Subject"] == "Clôture mensuelle : une question, Zoé"
    assert str(make_header(decode_header(raw_header(data, "Subject")))) == "Clôture mensuelle : une question, Zoé"
    assert one["From"].addresses[0].display_name == "Léa Martin" and one["From"].addresses[0].addr_spec == LEA.address
    assert one["To"].addresses[0].display_name == "Zoé Bouchard"
    assert two["To"].addresses[0].display_name == "François Lefèvre"
    assert one["Date"].datetime == NOW
    # RFC 2369 + RFC 8058.
    assert one["List-Unsubscribe"] == f"<https://links.acme-finance.example/u/tok.sig>, <mailto:{LEA.address}?subject=unsubscribe>"
    assert one["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    # Plain text first; the HTML alternative after it.
    assert one.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in one.iter_parts()] == ["text/plain", "text/html"]
    assert two.get_content_type() == "text/plain"
    for msg in (one, two):
        text = msg.get_body(("plain",)).get_content().replace("\r\n", "\n")
        assert "Léa Martin\nAcme Finance" in text and IDENTITY in text and OPT_OUT in text
    assert server.recorder.connections == 1


def test_one_connection_per_mailbox_for_the_whole_batch(server, tmp_path):
    smtp = connector(tmp_path, config(server.settings(), lea_smtp=server.settings()))
    batch = [touch(i, f"p{i}@client{i}.example", sender=(MARIE if i % 2 else LEA)) for i in range(1, 8)]
    results = smtp.send_batch(batch, NOW)
    assert [r.touch_id for r in results] == [t.touch_id for t in batch]
    assert all(r.error is None for r in results)
    assert len(server.recorder.received) == 7
    assert server.recorder.connections == 2  # Marie's and Léa's, not one per message
    by_peer: dict = {}
    for r in server.recorder.received:
        by_peer.setdefault(r.peer, set()).add(r.mail_from)
    assert sorted(map(sorted, by_peer.values())) == [[LEA.address], [MARIE.address]]


def test_messages_per_connection_renews_the_connection_without_counting_a_loss(server, tmp_path):
    server.recorder.per_connection = 2
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()), messages_per_connection=2)
    results = smtp.send_batch([touch(i, f"p{i}@c.example") for i in range(5)], NOW)
    assert all(r.error is None for r in results)
    assert server.recorder.connections == 3


# ---------------------------------------------------------------- refusals
def test_550_is_a_terminal_hard_bounce_451_transient_and_the_rest_still_goes(server, tmp_path):
    server.recorder.refuse = {
        "nobody@client2.example": "550 5.1.1 <nobody@client2.example>: Recipient address rejected: User unknown",
        "greylisted@client3.example": "451 4.7.1 Greylisted, try again later",
    }
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()))
    batch = [touch(1, "ok@client1.example"), touch(2, "nobody@client2.example"), touch(3, "greylisted@client3.example"), touch(4, "ok@client4.example")]
    ok1, hard, soft, ok4 = smtp.send_batch(batch, NOW)
    assert ok1.error is None and ok4.error is None
    assert isinstance(hard.error, RecipientRefused) and isinstance(hard.error, TerminalError)
    assert hard.error.code == 550 and "5.1.1" in str(hard.error) and "User unknown" in str(hard.error)
    assert hard.provider_message_id is None
    assert isinstance(soft.error, TransientError) and "451 4.7.1 Greylisted" in str(soft.error)
    assert [r.rcpt_tos for r in server.recorder.received] == [["ok@client1.example"], ["ok@client4.example"]]
    assert server.recorder.connections == 1  # RSET, not a new connection


def test_a_5xx_for_a_passing_condition_is_transient(server, tmp_path):
    server.recorder.refuse = {"full@c.example": "552 5.2.2 Mailbox full", "quota@c.example": "550 5.4.5 Daily user sending limit exceeded"}
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()))
    results = smtp.send_batch([touch(1, "full@c.example"), touch(2, "quota@c.example"), touch(3, "ok@c.example")], NOW)
    assert [type(r.error) for r in results] == [TransientError, TransientError, type(None)]
    assert results[1].error.retry_after == 3600.0


def test_a_connection_dropped_mid_batch_reconnects_once_then_the_rest_are_transient(server, tmp_path):
    server.recorder.per_connection = 2  # 421 and a hang-up at the third MAIL on a connection
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()))
    results = smtp.send_batch([touch(i, f"p{i}@c.example") for i in range(3)], NOW)
    assert all(r.error is None for r in results)  # the third went on the second connection
    assert server.recorder.connections == 2

    server.recorder.received.clear()
    server.recorder.ehlos.clear()
    results = smtp.send_batch([touch(i, f"p{i}@c.example") for i in range(10, 16)], NOW)
    assert [r.error is None for r in results] == [True, True, True, True, False, False]
    assert all(isinstance(r.error, TransientError) for r in results[4:])
    assert "421" in str(results[4].error)
    assert len(server.recorder.received) == 4 and server.recorder.connections == 2


def test_a_line_dropped_after_the_message_was_handed_over_is_not_resent(server, tmp_path):
    server.recorder.hang_up_after_data = {"p2@c.example"}
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()))
    results = smtp.send_batch([touch(i, f"p{i}@c.example") for i in range(1, 5)], NOW)
    assert results[1].touch_id == 2 and isinstance(results[1].error, DeliveryUnknown)
    assert isinstance(results[1].error, TerminalError) and "not resent" in str(results[1].error)
    assert [r.error for r in (results[0], results[2], results[3])] == [None, None, None]
    assert [r.rcpt_tos[0] for r in server.recorder.received] == [f"p{i}@c.example" for i in range(1, 5)]  # p2 once only
    assert server.recorder.connections == 2


def test_an_unreachable_server_is_transient(tmp_path):
    port = free_port()  # nothing listens there
    smtp = connector(tmp_path, config(None, lea_smtp={"host": "127.0.0.1", "port": port, "security": "none", "timeout_seconds": 2}))
    [result] = smtp.send_batch([touch(1, "p@c.example")], NOW)
    assert isinstance(result.error, TransientError) and f"127.0.0.1:{port}" in str(result.error)


def test_a_mailbox_without_smtp_is_terminal_and_names_the_config_key(server, tmp_path):
    smtp = connector(tmp_path, config(server.settings()))  # Marie has smtp, Léa has none
    lea, marie = smtp.send_batch([touch(1, "p1@c.example", sender=LEA), touch(2, "p2@c.example", sender=MARIE)], NOW)
    assert isinstance(lea.error, TerminalError) and "senders.sales[1].smtp" in str(lea.error)
    assert marie.error is None
    stranger = Sender("someone@elsewhere.example", "Someone")
    [result] = smtp.send_batch([touch(3, "p3@c.example", sender=stranger)], NOW)
    assert isinstance(result.error, TerminalError) and "not a mailbox" in str(result.error)
    relayed = connector(tmp_path, config(server.settings()), relay=server.settings())
    assert relayed.send_batch([touch(4, "p4@c.example", sender=LEA)], NOW)[0].error is None


def test_a_bad_address_fails_alone(server, tmp_path):
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()))
    bad, good = smtp.send_batch([touch(1, "not an address"), touch(2, "p2@c.example")], NOW)
    assert isinstance(bad.error, TerminalError) and good.error is None
    assert len(server.recorder.received) == 1


def test_an_internationalised_domain_travels_as_idna_in_the_envelope_and_the_header(server, tmp_path):
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()))
    [result] = smtp.send_batch([touch(1, "contact@société-générale.example")], NOW)
    assert result.error is None
    [received] = server.recorder.received
    idna = "société-générale.example".encode("idna").decode()
    assert idna.startswith("xn--") and received.rcpt_tos == [f"contact@{idna}"]
    assert received.message["To"].addresses[0].domain == idna


# ---------------------------------------------------------------- TLS and login
@pytest.fixture
def tls_server(smtp_tls_server):
    return smtp_tls_server


def test_starttls_and_login_with_the_password_from_the_environment(tls_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SMTP_PASSWORD_LEA", PASSWORD)
    box = tls_server.settings(username=USERNAME, password_env="SMTP_PASSWORD_LEA")
    smtp = connector(tmp_path, config(None, lea_smtp=box), tls_ca_file=str(tls_server.ca_file))
    results = smtp.send_batch([touch(i, f"p{i}@c.example") for i in range(3)], NOW)
    assert all(r.error is None for r in results)
    assert [r.login for r in tls_server.recorder.received] == [USERNAME] * 3
    assert tls_server.recorder.connections == 1  # EHLO twice (before and after STARTTLS), one connection


def test_a_refused_login_is_terminal_for_every_touch_of_that_mailbox(tls_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SMTP_PASSWORD_LEA", "wrong")
    box = tls_server.settings(username=USERNAME, password_env="SMTP_PASSWORD_LEA")
    smtp = connector(tmp_path, config(None, lea_smtp=box), tls_ca_file=str(tls_server.ca_file))
    results = smtp.send_batch([touch(i, f"p{i}@c.example") for i in range(3)], NOW)
    assert all(isinstance(r.error, TerminalError) and "senders.sales[1].smtp" in str(r.error) and "535" in str(r.error) for r in results)
    assert tls_server.recorder.received == []


def test_an_unset_password_variable_is_terminal_and_names_it(tls_server, tmp_path, monkeypatch):
    monkeypatch.delenv("SMTP_PASSWORD_NOPE", raising=False)
    box = tls_server.settings(username=USERNAME, password_env="SMTP_PASSWORD_NOPE")
    smtp = connector(tmp_path, config(None, lea_smtp=box), tls_ca_file=str(tls_server.ca_file))
    [result] = smtp.send_batch([touch(1, "p@c.example")], NOW)
    assert isinstance(result.error, TerminalError)
    assert "senders.sales[1].smtp.password_env" in str(result.error) and "SMTP_PASSWORD_NOPE" in str(result.error)


def test_an_untrusted_certificate_is_terminal(tls_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SMTP_PASSWORD_LEA", PASSWORD)
    box = tls_server.settings(username=USERNAME, password_env="SMTP_PASSWORD_LEA")
    smtp = connector(tmp_path, config(None, lea_smtp=box))  # the system store does not know our test CA
    [result] = smtp.send_batch([touch(1, "p@c.example")], NOW)
    assert isinstance(result.error, TerminalError) and "certificate" in str(result.error).lower()
    assert tls_server.recorder.received == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # aiosmtpd cannot see implicit TLS
def test_implicit_tls(tmp_path, monkeypatch):
    monkeypatch.setenv("SMTP_PASSWORD_LEA", PASSWORD)
    server = start_tls(tmp_path, implicit=True)
    try:
        box = server.settings(username=USERNAME, password_env="SMTP_PASSWORD_LEA")
        assert box["security"] == "ssl"
        smtp = connector(tmp_path, config(None, lea_smtp=box), tls_ca_file=str(server.ca_file))
        assert [r.error for r in smtp.send_batch([touch(1, "p@c.example"), touch(2, "q@c.example")], NOW)] == [None, None]
        assert [r.login for r in server.recorder.received] == [USERNAME, USERNAME]
    finally:
        server.stop()


# ---------------------------------------------------------------- DKIM
@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory) -> tuple[Path, bytes]:
    """(private key file, the TXT record to publish at <selector>._domainkey.<domain>)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def dns_for(record: bytes, name: bytes = b"relance2026._domainkey.acme-finance.example."):
    def dnsfunc(query: bytes, timeout: float = 5) -> bytes | None:
        return record if query == name else None

    return dnsfunc


def test_dkim_signature_verifies_and_covers_both_unsubscribe_headers(server, tmp_path, dkim_key):
    path, record = dkim_key
    dkim_settings = {"domain": "acme-finance.example", "selector": "relance2026", "private_key_path": str(path)}
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()), dkim=dkim_settings)
    first = touch(1, "zoe.bouchard@sge-equipement.example")
    results = smtp.send_batch([first, touch(2, "f.lefevre@brasserie-faubourg.example", in_reply_to=first.message_id)], NOW)
    assert all(r.error is None for r in results)
    for received in server.recorder.received:
        data = received.data
        assert dkim.verify(data, dnsfunc=dns_for(record))
        tags = dict(t.strip().split("=", 1) for t in received.message["DKIM-Signature"].replace("\r\n", "").split(";") if "=" in t)
        assert tags["d"] == "acme-finance.example" and tags["s"] == "relance2026"
        signed = {h.strip().lower() for h in tags["h"].split(":")}
        assert {"from", "to", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post"} <= signed
        # Tampering with the opt-out headers, or adding one, breaks the signature.
        assert not dkim.verify(data.replace(b"tok.sig", b"tok.evil"), dnsfunc=dns_for(record))
        assert not dkim.verify(b"List-Unsubscribe: <https://evil.example/u>\r\n" + data, dnsfunc=dns_for(record))
        assert not dkim.verify(data, dnsfunc=dns_for(record, b"other._domainkey.acme-finance.example."))
    assert "in-reply-to" in server.recorder.received[1].message["DKIM-Signature"].lower()


def test_dkim_signs_only_the_domains_it_has_a_key_for(server, tmp_path, dkim_key, monkeypatch):
    path, record = dkim_key
    monkeypatch.setenv("DKIM_KEY", path.read_text())
    cfg = config(None, lea_smtp=server.settings())
    cfg.senders["sales"].append(cfg.senders["sales"][1].model_copy(update={"email": "lea@other-brand.example"}))
    smtp = connector(tmp_path, cfg, dkim=[{"domain": "acme-finance.example", "selector": "relance2026", "private_key_env": "DKIM_KEY"}])
    other = Sender("lea@other-brand.example", "Léa Martin")
    results = smtp.send_batch([touch(1, "p1@c.example"), touch(2, "p2@c.example", sender=other)], NOW)
    assert all(r.error is None for r in results)
    signed, unsigned = (r.message for r in server.recorder.received)
    assert "DKIM-Signature" in signed and "DKIM-Signature" not in unsigned
    assert dkim.verify(server.recorder.received[0].data, dnsfunc=dns_for(record))


def test_an_unreadable_dkim_key_fails_the_touches_it_would_sign(server, tmp_path):
    (tmp_path / "bad.pem").write_text("not a key")
    smtp = connector(tmp_path, config(None, lea_smtp=server.settings()), dkim={"domain": "acme-finance.example", "selector": "s", "private_key_path": "bad.pem"})
    [result] = smtp.send_batch([touch(1, "p@c.example")], NOW)
    assert isinstance(result.error, TerminalError) and "connectors.email.settings.dkim[0]" in str(result.error)
    missing = connector(tmp_path, config(None, lea_smtp=server.settings()), dkim={"domain": "acme-finance.example", "selector": "s", "private_key_path": "nope.pem"})
    assert "nope.pem" in str(missing.send_batch([touch(2, "p@c.example")], NOW)[0].error)
    assert server.recorder.received == []


def test_settings_are_checked():
    assert SmtpSettings.model_validate({"dkim": {"domain": "Acme.example.", "selector": "s1", "private_key_path": "k.pem"}}).dkim[0].domain == "acme.example"
    for bad in (
        {"dkim": {"domain": "acme.example", "selector": "s1"}},  # no key
        {"dkim": {"domain": "acme.example", "selector": "s1", "private_key_path": "k", "private_key_env": "K"}},
        {"dkim": [{"domain": "a.example", "selector": "s", "private_key_env": "K"}] * 2},
        {"messages_per_connection": 0},
        {"relay": {"host": "smtp.example"}},  # no port
    ):
        with pytest.raises(ValidationError):
            SmtpSettings.model_validate(bad)


# ---------------------------------------------------------------- polling
def test_poll_hands_only_the_mailboxes_with_imap_to_the_imap_reader(tmp_path, monkeypatch):
    assert Capability.polling in SmtpEmail.capabilities and Capability.idempotent_send not in SmtpEmail.capabilities
    assert connector(tmp_path, config(None)).poll(NOW) == []  # no imap anywhere: connectors.imap is not needed
    calls = []
    event = InboundEvent(EventKind.replied, Channel.email, NOW, "imap:1", recipient="zoe@c.example")

    def poll_mailboxes(workspace, mailboxes, now, *, tls=None):
        calls.append((workspace, [m.email for m in mailboxes], now))
        return iter([event])

    monkeypatch.setitem(sys.modules, "connectors.imap", types.SimpleNamespace(poll_mailboxes=poll_mailboxes))
    smtp = connector(tmp_path, config(None, imap={"host": "127.0.0.1", "port": 1143, "security": "none"}))
    assert smtp.poll(NOW) == [event]
    assert calls == [(smtp.workspace, [LEA.address], NOW)]


# ---------------------------------------------------------------- threading through the engine
THREADED = """
name: threaded
owner: marie@acme.example
schedule:
  timezone: prospect
  window: {days: mon-fri, hours: ["09:00-17:00"]}
  holidays: FR
sender: {pool: sales}
exit_on: [replied, bounced, unsubscribed]
steps:
  - id: intro
    email: {template: email/intro.j2, subject: "Clôture mensuelle chez {{ prospect.company }}"}
  - id: bump
    wait: 2 business days
    email: {reply_to: intro, template: email/bump.j2}
  - id: breakup
    wait: 3 business days
    email: {reply_to: intro, template: email/bump.j2}
  - id: news
    wait: 1 week
    email: {template: email/bump.j2, subject: "Nouvelles d'Acme Finance"}
"""


def _smtp_workspace(server, tmp_path):
    """The test workspace with the `threaded` cadence, sending through the aiosmtpd server."""
    root = write_workspace(tmp_path / "ws", f"sqlite:///{tmp_path / 'relance.db'}", sequences={"threaded.yaml": THREADED})
    data = yaml.safe_load((root / "config.yaml").read_text())
    data["connectors"]["email"] = {"use": "smtp", "settings": {"helo_hostname": "relance.test"}}
    for box in data["senders"]["sales"]:
        box["smtp"] = server.settings()
    (root / "config.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return Workspace.load(root)


def test_a_cadence_threads_its_follow_ups_on_the_first_email(server, tmp_path):
    ws = _smtp_workspace(server, tmp_path)
    try:
        start_at = at("2027-03-15T07:00:00")  # a Monday, 08:00 in Paris
        with ws.store.begin() as conn:
            [pid] = conn.execute(insert(prospects).returning(prospects.c.id), [{
                "email": "zoe.bouchard@sge-equipement.example", "first_name": "Zoé", "last_name": "Bouchard",
                "company": "SGE Équipement", "timezone": "Europe/Paris", "country": "FR", "attributes": {},
                "created_at": start_at, "updated_at": start_at,
            }]).scalars()
        assert enroll(ws, ws.sequence("threaded"), [pid], start_at).enrolled == 1
        now = start_at
        for _ in range(12):  # dispatch at each due time, as the scheduler would
            with ws.store.connect() as conn:
                row = conn.execute(select(enrollments.c.state, enrollments.c.next_due_at).where(enrollments.c.prospect_id == pid)).one()
            if row.state != "active" or row.next_due_at is None:
                break
            due = row.next_due_at if row.next_due_at.tzinfo else row.next_due_at.replace(tzinfo=timezone.utc)
            now = max(now, due)
            Dispatcher(ws).run(now)
            now += timedelta(minutes=1)
    finally:
        ws.close()

    received = server.recorder.received
    assert len(received) == 4, [r.message["Subject"] for r in received]
    intro, bump, breakup, news = (r.message for r in received)
    sender = received[0].mail_from
    assert {r.mail_from for r in received} == {sender}  # the sticky sender
    assert all(m["From"].addresses[0].addr_spec == sender for m in (intro, bump, breakup, news))
    assert intro["Message-ID"].endswith(f"@{sender.split('@')[1]}>")
    assert intro["Subject"] == "Clôture mensuelle chez SGE Équipement"
    assert "In-Reply-To" not in intro and "References" not in intro
    for follow_up in (bump, breakup):
        assert follow_up["In-Reply-To"] == intro["Message-ID"]
        assert follow_up["References"] == intro["Message-ID"]
        assert follow_up["Subject"] == "Re: Clôture mensuelle chez SGE Équipement"
        assert follow_up["Message-ID"] not in (intro["Message-ID"],)
    assert len({m["Message-ID"] for m in (intro, bump, breakup, news)}) == 4
    # A new topic is not a reply: no "Re: ", no threading headers.
    assert news["Subject"] == "Nouvelles d'Acme Finance" and "In-Reply-To" not in news and "References" not in news
    dates = [m["Date"].datetime for m in (intro, bump, breakup, news)]
    assert dates == sorted(dates) and dates[-1] - dates[0] > timedelta(days=10)  # the simulated clock, not the wall clock
    for m in (intro, bump, breakup, news):
        assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert m["List-Unsubscribe"].strip().startswith("<https://links.acme.example/u/")
        assert m["List-Unsubscribe"].strip().endswith(f", <mailto:{sender}?subject=unsubscribe>")
        text = m.get_body(("plain",)).get_content().replace("\r\n", "\n")
        assert "Acme Finance SAS, 12 rue de la Paix, 75002 Paris" in text and "Pour ne plus être contacté" in text


# ---------------------------------------------------------------- outcomes through the engine
def _enroll(ws, emails, when):
    with ws.store.begin() as conn:
        ids = conn.execute(insert(prospects).returning(prospects.c.id, sort_by_parameter_order=True), [{
            "email": email, "first_name": "Zoé", "last_name": f"P{i}", "company": "SGE", "timezone": "Europe/Paris",
            "country": "FR", "attributes": {}, "created_at": when, "updated_at": when,
        } for i, email in enumerate(emails)]).scalars().all()
    assert enroll(ws, ws.sequence("threaded"), ids, when).enrolled == len(ids)
    return ids


def test_a_recipient_refused_at_send_time_is_a_hard_bounce_that_suppresses(server, tmp_path):
    from relance.store import events, suppressions, touches

    server.recorder.refuse = {"nobody@client2.example": "550 5.1.1 <nobody@client2.example>: User unknown"}
    ws = _smtp_workspace(server, tmp_path)
    try:
        start_at = at("2027-03-16T09:00:00")  # a Tuesday, 10:00 in Paris
        refused, fine = _enroll(ws, ["nobody@client2.example", "zoe@client1.example"], start_at)
        summary = Dispatcher(ws).run(start_at)
        assert summary.sent["email"] == 1 and summary.failed["email"] == 1
        with ws.store.connect() as conn:
            states = dict(conn.execute(select(enrollments.c.prospect_id, enrollments.c.state)).all())
            bounce = conn.execute(select(events.c.detail, events.c.payload).where(events.c.kind == "bounced")).one()
            suppressed = conn.execute(select(suppressions.c.kind, suppressions.c.value)).all()
            status = dict(conn.execute(select(touches.c.prospect_id, touches.c.status)).all())
    finally:
        ws.close()
    assert states == {refused: "exited", fine: "active"}
    assert bounce.detail == "hard" and "5.1.1" in bounce.payload["reason"]
    assert ("email", "nobody@client2.example") in suppressed
    assert status == {refused: "failed", fine: "sent"}


def test_a_connection_lost_after_the_data_leaves_the_touch_unknown_and_paused(server, tmp_path):
    from relance.store import touches

    server.recorder.hang_up_after_data = {"zoe@client1.example"}
    ws = _smtp_workspace(server, tmp_path)
    try:
        start_at = at("2027-03-16T09:00:00")
        [pid] = _enroll(ws, ["zoe@client1.example"], start_at)
        Dispatcher(ws).run(start_at)
        Dispatcher(ws).run(start_at + timedelta(hours=2))  # never resent blindly
        with ws.store.connect() as conn:
            state = conn.execute(select(enrollments.c.state, enrollments.c.reason).where(enrollments.c.prospect_id == pid)).one()
            status = conn.scalar(select(touches.c.status).where(touches.c.prospect_id == pid))
    finally:
        ws.close()
    assert status == "unknown" and state.state == "paused" and "unknown" in state.reason
    assert len(server.recorder.received) == 1

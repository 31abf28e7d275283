"""The messages we build must survive a real parser: every header, encoded words, threading."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

import pytest

from relance.channels import OutboundTouch, Sender
from relance.email_message import build_email, make_message_id, one_line
from relance.errors import TerminalError
from relance.events import Channel

PARIS_MORNING = datetime(2026, 3, 2, 9, 17, 4, tzinfo=timezone(timedelta(hours=1)))
MARIE = Sender(address="marie.dupont@acme-finance.example", name="Marie Dupont", signature="Marie Dupont\nAcme Finance")
HELENE = Sender(address="helene.lefevre@acme-finance.example", name="Hélène Lefèvre-Cœur")


def touch(**overrides) -> OutboundTouch:
    key = overrides.pop("idempotency_key", "enr-4812:intro:1")
    sender = overrides.pop("sender", MARIE)
    values = dict(
        touch_id=4812,
        idempotency_key=key,
        channel=Channel.email,
        action="send",
        recipient="zoe.bouchard@societe-generale-equipement.example",
        recipient_name="Zoé Bouchard",
        sender=sender,
        subject="Zoé, une question sur la trésorerie de SGE",
        body="Bonjour Zoé,\n\nJ'ai vu que SGE ouvrait un bureau à Lyon.\n\nBien à vous,\nMarie Dupont\n",
        message_id=make_message_id(sender.address, key),
        unsubscribe_url="https://acme-finance.example/u/eyJwIjo0ODEyfQ.sig",
        unsubscribe_mailto="mailto:marie.dupont@acme-finance.example?subject=unsubscribe",
        metadata={"date": PARIS_MORNING},
    )
    values.update(overrides)
    return OutboundTouch(**values)


def roundtrip(msg: EmailMessage) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(msg.as_bytes())


def text_of(part: EmailMessage) -> str:
    return part.get_content().replace("\r\n", "\n")  # CRLF on the wire, LF in our data


def test_every_header_survives_a_parser():
    t = touch()
    raw = build_email(t).as_bytes()
    parsed = BytesParser(policy=policy.default).parsebytes(raw)

    assert parsed["From"].addresses[0].display_name == "Marie Dupont"
    assert parsed["From"].addresses[0].addr_spec == "marie.dupont@acme-finance.example"
    (to,) = parsed["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Zoé Bouchard", "zoe.bouchard@societe-generale-equipement.example")
    assert parsed["Subject"] == "Zoé, une question sur la trésorerie de SGE"
    assert parsedate_to_datetime(parsed["Date"]) == PARIS_MORNING
    assert parsed["Message-ID"] == t.message_id
    assert parsed["List-Unsubscribe"] == (
        "<https://acme-finance.example/u/eyJwIjo0ODEyfQ.sig>, "
        "<mailto:marie.dupont@acme-finance.example?subject=unsubscribe>"
    )
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["X-Relance-Touch"] == "enr-4812:intro:1"
    assert parsed["MIME-Version"] == "1.0"
    assert parsed["In-Reply-To"] is None and parsed["References"] is None
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert text_of(parsed) == t.body
    # Wire format: CRLF everywhere, 7-bit clean, no line over 78 characters in the header.
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


def test_accented_display_name_and_subject_are_rfc2047_encoded_and_round_trip():
    t = touch(
        sender=HELENE,
        message_id=make_message_id(HELENE.address, "enr-4812:intro:1"),
        recipient_name="Françoise Øster-Müller, DAF",
        subject="Équipe financière : une idée pour réduire le BFR à Besançon — très concrètement",
    )
    raw = build_email(t).as_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    assert re.search(r"^From: .*=\?utf-8\?[qb]\?", head, re.M | re.I)
    assert re.search(r"^Subject: .*=\?utf-8\?[qb]\?", head, re.M | re.I)
    assert "Équipe" not in head and "Hélène" not in head

    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert parsed["From"].addresses[0].display_name == "Hélène Lefèvre-Cœur"
    (to,) = parsed["To"].addresses  # the comma in the name is quoted, not a second recipient
    assert to.display_name == "Françoise Øster-Müller, DAF"
    assert parsed["Subject"] == t.subject


def test_follow_up_carries_threading_headers():
    root = make_message_id(MARIE.address, "enr-4812:intro:1")
    bump = make_message_id(MARIE.address, "enr-4812:bump:1")
    t = touch(idempotency_key="enr-4812:breakup:1", message_id=make_message_id(MARIE.address, "enr-4812:breakup:1"),
              subject="Re: Zoé, une question sur la trésorerie de SGE", in_reply_to=bump, references=(root, bump))
    parsed = roundtrip(build_email(t))
    assert parsed["In-Reply-To"] == bump
    assert parsed["References"].split() == [root, bump]
    assert parsed["Message-ID"] not in (root, bump)


def test_references_end_with_the_parent_when_only_in_reply_to_is_known():
    root = make_message_id(MARIE.address, "enr-4812:intro:1")
    parsed = roundtrip(build_email(touch(idempotency_key="enr-4812:bump:1", in_reply_to=root)))
    assert parsed["In-Reply-To"] == root
    assert parsed["References"] == root


def test_no_header_injection_from_prospect_data():
    t = touch(
        recipient_name="Zoé Bouchard\r\nBcc: x@y",
        subject="Bonjour\r\nBcc: victim@example.com\nX-Evil: 1",
        sender=Sender(address="marie.dupont@acme-finance.example", name="Marie\rDupont\u2028Reply-To: a@b"),
        message_id=make_message_id(MARIE.address, "enr-4812:intro:1"),
        unsubscribe_url="https://acme-finance.example/u/tok\r\nBcc: z@z",
    )
    raw = build_email(t).as_bytes()
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert parsed["Bcc"] is None and parsed["X-Evil"] is None and parsed["Reply-To"] is None
    (to,) = parsed["To"].addresses
    assert to.addr_spec == "zoe.bouchard@societe-generale-equipement.example"
    assert to.display_name == "Zoé Bouchard Bcc: x@y"
    assert parsed["Subject"] == "Bonjour Bcc: victim@example.com X-Evil: 1"
    assert parsed["From"].addresses[0].display_name == "Marie Dupont Reply-To: a@b"
    assert not re.search(rb"^(Bcc|X-Evil|Reply-To):", raw, re.M | re.I)
    assert len(parsed["List-Unsubscribe"].split(",")) == 2


def test_no_one_click_header_without_https():
    parsed = roundtrip(build_email(touch(unsubscribe_url="http://127.0.0.1:8000/u/tok", unsubscribe_mailto=None)))
    assert parsed["List-Unsubscribe"] == "<http://127.0.0.1:8000/u/tok>"
    assert parsed["List-Unsubscribe-Post"] is None


def test_mailto_only_unsubscribe_is_prefixed():
    parsed = roundtrip(build_email(touch(unsubscribe_url=None, unsubscribe_mailto="desinscription@acme-finance.example")))
    assert parsed["List-Unsubscribe"] == "<mailto:desinscription@acme-finance.example>"
    assert parsed["List-Unsubscribe-Post"] is None


def test_no_unsubscribe_headers_when_none_given():
    parsed = roundtrip(build_email(touch(unsubscribe_url=None, unsubscribe_mailto=None)))
    assert parsed["List-Unsubscribe"] is None and parsed["List-Unsubscribe-Post"] is None


def test_date_precedence_explicit_then_metadata_then_now():
    explicit = datetime(2026, 6, 1, 14, 0, tzinfo=timezone.utc)
    assert parsedate_to_datetime(roundtrip(build_email(touch(), date=explicit))["Date"]) == explicit
    naive = touch(metadata={"date": datetime(2026, 3, 2, 9, 0)})  # naive: not trusted, the clock wins
    before = datetime.now(timezone.utc).replace(microsecond=0)
    got = parsedate_to_datetime(roundtrip(build_email(naive))["Date"])
    assert before <= got <= datetime.now(timezone.utc)


def test_message_id_is_deterministic_per_key_and_uses_the_sender_domain():
    a = make_message_id("marie.dupont@acme-finance.example", "enr-1:intro:1")
    assert a == make_message_id("marie.dupont@acme-finance.example", "enr-1:intro:1")
    assert a != make_message_id("marie.dupont@acme-finance.example", "enr-1:intro:2")
    assert re.fullmatch(r"<[0-9a-f]{32}@acme-finance\.example>", a)
    assert make_message_id("contact@bücher-société.fr", "k").endswith("@" + "bücher-société.fr".encode("idna").decode() + ">")
    assert make_message_id("no-domain", "k").endswith("@relance.invalid>")


def test_missing_message_id_falls_back_to_the_deterministic_one():
    parsed = roundtrip(build_email(touch(message_id=None)))
    assert parsed["Message-ID"] == make_message_id(MARIE.address, "enr-4812:intro:1")


def test_plain_text_first_then_optional_html():
    t = touch(metadata={"date": PARIS_MORNING, "html": "<p>Bonjour Zoé,</p>"})
    parsed = roundtrip(build_email(t))
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert text_of(parts[0]) == t.body


def test_ascii_body_stays_7bit_and_accented_body_is_quoted_printable():
    ascii_msg = build_email(touch(body="Hello Zoe,\n\nQuick question.\n"))
    assert ascii_msg["Content-Transfer-Encoding"] == "7bit"
    accented = build_email(touch())
    assert accented["Content-Transfer-Encoding"] == "quoted-printable"


def test_company_identity_is_added_once():
    identity = "Acme Finance SAS, 12 rue de la Paix, 75002 Paris"
    body = text_of(roundtrip(build_email(touch(), company_identity=identity)))
    assert body.rstrip().endswith(identity)
    already = touch(body=f"Bonjour,\n\n--\n{identity}\n")
    assert text_of(roundtrip(build_email(already, company_identity=identity))).count(identity) == 1


@pytest.mark.parametrize("recipient", ["", "zoe.bouchard", "zoé@exemple.fr", "@exemple.fr", "zoe@", "zoe@exa mple.fr"])
def test_unusable_recipient_is_a_terminal_error(recipient):
    with pytest.raises(TerminalError):
        build_email(touch(recipient=recipient))


def test_idn_recipient_domain_is_punycoded():
    parsed = roundtrip(build_email(touch(recipient="zoe@exemple-société.fr")))
    assert parsed["To"].addresses[0].domain == "xn--exemple-socit-mhbb.fr"


def test_one_line():
    assert one_line("a\r\nb\tc\x00d\u2028e") == "a b c d e"
    assert one_line(None) == ""

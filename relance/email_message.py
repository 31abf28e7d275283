"""Real RFC 5322 messages, built one way for the sandbox and the SMTP connector alike.

The stdlib `email` package with the SMTP policy does the hard parts (RFC 2047 encoded
words, folding, quoting display names); this module decides which headers a prospecting
email carries and keeps prospect data out of header syntax.
"""

from __future__ import annotations

import email.policy
import hashlib
import re
from datetime import datetime, timezone
from email.headerregistry import Address, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime
from functools import lru_cache

from relance.channels import OutboundTouch
from relance.errors import TerminalError

__all__ = ["POLICY", "build_email", "make_message_id", "one_line"]


class _ClassCachingRegistry(HeaderRegistry):
    """The stock registry builds a new class for every header it parses; reusing them makes
    building a message about a quarter faster, which matters at 100k messages a run."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


# email.policy.SMTP (CRLF, RFC 2047 for non-ASCII headers), with the faster registry.
POLICY = email.policy.SMTP.clone(header_factory=_ClassCachingRegistry())

# Control characters and Unicode line breaks: a CR/LF in a name must never start a header.
_BREAKS = re.compile(r"\s*[\x00-\x1f\x7f\x85\u2028\u2029]+\s*")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_ID_UNSAFE = re.compile(r"[\s<>\"()\[\]\\,;:]")
_URL_UNSAFE = re.compile(r"[\s<>\"]")
_MAX_LINE = 998  # RFC 5322 hard limit per line, CRLF excluded


def one_line(value: object) -> str:
    """Fold every line break and control character to a space, so data stays one header value."""
    if value is None:
        return ""
    return _BREAKS.sub(" ", str(value)).strip()


@lru_cache(maxsize=1024)  # a handful of sender domains, one lookup per email sent
def _ascii_domain(domain: str) -> str | None:
    domain = one_line(domain).strip(".").lower()
    if not domain:
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return domain if _DOMAIN.match(domain) else None


def make_message_id(sender_address: str, idempotency_key: str) -> str:
    """Deterministic for a key, so a retried send carries the Message-ID of the first try."""
    token = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    _, at, domain = sender_address.rpartition("@")
    domain = (_ascii_domain(domain) if at else None) or "relance.invalid"
    return f"<{token}@{domain}>"


def _msg_id(value: str | None) -> str | None:
    value = one_line(value)
    if not value:
        return None
    value = _ID_UNSAFE.sub("", value.strip("<>"))
    return f"<{value}>" if value else None


def _address(name: str | None, addr: str, role: str) -> Address:
    addr = one_line(addr)
    local, at, domain = addr.rpartition("@")
    ascii_domain = _ascii_domain(domain)
    if not at or not local or ascii_domain is None:
        raise TerminalError(f"{role} address {addr!r} is not an email address")
    if not local.isascii():
        raise TerminalError(f"{role} address {addr!r} has a non-ASCII local part (needs SMTPUTF8)")
    if not _DOT_ATOM.match(local):
        raise TerminalError(f"{role} address {addr!r} is not an email address")
    # username/domain rather than addr_spec: validated above, so no second parse per message.
    return Address(display_name=one_line(name), username=local, domain=ascii_domain)


def _date(touch: OutboundTouch, date: datetime | None) -> datetime:
    for candidate in (date, touch.metadata.get("date") if touch.metadata else None):
        if isinstance(candidate, datetime) and candidate.tzinfo is not None and candidate.utcoffset() is not None:
            return candidate
    return datetime.now(timezone.utc)


def _unsubscribe(url: str | None, mailto: str | None) -> tuple[str | None, bool]:
    """RFC 2369 List-Unsubscribe, and whether RFC 8058 one-click applies (HTTPS only)."""
    parts: list[str] = []
    one_click = False
    url = _URL_UNSAFE.sub("", one_line(url))
    if url:
        parts.append(f"<{url}>")
        one_click = url.lower().startswith("https://")
    mailto = _URL_UNSAFE.sub("", one_line(mailto))
    if mailto:
        if not mailto.lower().startswith("mailto:"):
            mailto = f"mailto:{mailto}"
        parts.append(f"<{mailto}>")
    return (", ".join(parts) or None), one_click


def _body(text: str, company_identity: str | None) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    identity = (company_identity or "").strip()
    if identity and identity not in text:  # who writes, and how to reach them (CNIL, CAN-SPAM)
        text = f"{text.rstrip()}\n\n{identity}"
    return text if text.endswith("\n") else text + "\n"


def build_email(
    touch: OutboundTouch,
    *,
    company_identity: str | None = None,
    date: datetime | None = None,
) -> EmailMessage:
    """The message exactly as a provider would receive it; raises TerminalError for an
    address no server would accept, so one bad prospect fails alone.

    `date` (aware) overrides touch.metadata["date"], itself preferred over the wall clock,
    so runs on a simulated clock write simulated dates.
    """
    msg = EmailMessage(policy=POLICY)
    msg["From"] = _address(touch.sender.name, touch.sender.address, "sender")
    msg["To"] = _address(touch.recipient_name, touch.recipient, "recipient")
    if touch.subject is not None:
        msg["Subject"] = one_line(touch.subject)
    msg["Date"] = format_datetime(_date(touch, date))
    msg["Message-ID"] = _msg_id(touch.message_id) or make_message_id(touch.sender.address, touch.idempotency_key)
    in_reply_to = _msg_id(touch.in_reply_to)
    references = [r for r in (_msg_id(ref) for ref in touch.references) if r]
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        if in_reply_to not in references:  # RFC 5322 3.6.4: the parent's id ends References
            references.append(in_reply_to)
    if references:
        msg["References"] = " ".join(references)
    unsubscribe, one_click = _unsubscribe(touch.unsubscribe_url, touch.unsubscribe_mailto)
    if unsubscribe:
        msg["List-Unsubscribe"] = unsubscribe
        if one_click:
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["X-Relance-Touch"] = one_line(touch.idempotency_key)

    body = _body(touch.body or "", company_identity)
    # 7bit when it already is; quoted-printable otherwise, so no relay needs 8BITMIME.
    seven_bit = body.isascii() and all(len(line) <= _MAX_LINE for line in body.split("\n"))
    msg.set_content(body, subtype="plain", charset="utf-8", cte="7bit" if seven_bit else "quoted-printable")
    html = touch.metadata.get("html") if touch.metadata else None
    if isinstance(html, str) and html.strip():
        msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")  # plain text stays first
    return msg

"""What an inbound email is: a human reply, an auto-reply, a bounce, a complaint or an opt-out.

Pure: bytes in, a `Classification` out, no I/O, so the IMAP connector, a webhook for
inbound mail and the tests share one judgement. The order of the checks is the policy:

1. a feedback report (ARF, RFC 5965) is a complaint;
2. a delivery-status report, or whatever GNU Mailman's detector (flufl.bounce) recognises, is
   a bounce, even when it also says `Auto-Submitted` (every DSN is auto-submitted);
3. mailing-list traffic, spam-flagged mail, read receipts and success reports are not
   responses (kind None);
4. RFC 3834 `Auto-Submitted`, `Precedence: auto_reply/bulk/junk`, `X-Autoreply` and
   out-of-office subjects make an auto-reply, with the return date when the text gives one;
5. an opt-out written in the new text of a reply (never in the quoted original) is an
   unsubscription;
6. anything else from a person is a reply.

A malformed message never raises: it comes back with kind None and the reason.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import html
import logging
import re
import unicodedata
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import Message

from relance.events import EventKind

__all__ = ["Classification", "classify", "parse_return_date", "new_text"]

log = logging.getLogger("relance.classify")

MAX_BYTES = 30 * 1024 * 1024  # beyond this a message is not a reply worth parsing


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one inbound message, with every handle needed to match it to a touch."""

    kind: EventKind | None  # None: not a response we act on (spam, list mail, malformed)
    reason: str  # why, in a few words, for logs and for the event payload
    detail: str | None = None  # "hard"/"soft" for a bounce; the ISO return date of an auto-reply
    status: str | None = None  # DSN status code of a bounce, e.g. "5.1.1"
    diagnostic: str | None = None  # the remote server's words
    recipients: tuple[str, ...] = ()  # bouncing or complaining addresses (not the replier)
    return_date: date | None = None  # the day an absent person is back
    message_id: str | None = None  # this message's own Message-ID
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    original_message_id: str | None = None  # our email's Message-ID inside a DSN or ARF report
    from_address: str | None = None
    subject: str = ""
    sent_at: datetime | None = None  # the Date header, aware UTC

    @property
    def match_ids(self) -> tuple[str, ...]:
        """Message-IDs that may be ours, most specific first: the returned original, the
        parent, then the thread from newest to oldest."""
        seen: dict[str, None] = {}
        for mid in (self.original_message_id, self.in_reply_to, *reversed(self.references)):
            if mid:
                seen.setdefault(mid, None)
        return tuple(seen)

    @property
    def about(self) -> tuple[str, ...]:
        """The addresses the event concerns: the bouncing or complaining ones, else the sender."""
        if self.recipients:
            return self.recipients
        return (self.from_address,) if self.from_address else ()


# --------------------------------------------------------------------------- entry point


def classify(
    raw: bytes, *, received_at: datetime | None = None, own_addresses: Collection[str] = ()
) -> Classification:
    """Classify one raw RFC 5322 message. `received_at` dates an out-of-office without a
    Date header; mail from `own_addresses` (our own copies) is not a response."""
    try:
        return _classify(raw, received_at, {a.lower() for a in own_addresses})
    except Exception as exc:  # noqa: BLE001 - a hostile message must not stop the batch
        log.warning("unclassifiable message: %s", exc, exc_info=True)
        return Classification(None, f"malformed message: {type(exc).__name__}: {exc}"[:300])


def _classify(raw: bytes, received_at: datetime | None, own: set[str]) -> Classification:
    if not isinstance(raw, (bytes, bytearray)):
        return Classification(None, f"not a raw message: {type(raw).__name__}")
    if not raw.strip():
        return Classification(None, "empty message")
    if len(raw) > MAX_BYTES:
        return Classification(None, f"message too large ({len(raw)} bytes)")
    msg = email.message_from_bytes(bytes(raw), policy=email.policy.compat32)
    if not any(msg.get(h) for h in ("From", "Subject", "Date", "Message-ID", "Content-Type", "Received")):
        return Classification(None, "no mail headers")
    base = _ids(msg, received_at)

    if (arf := _feedback_report(msg)) is not None:
        return _with(base, EventKind.complained, "feedback report (ARF)", **arf)
    if (bounce := _bounce(msg)) is not None:
        return _with(base, EventKind.bounced, **bounce)

    sender = base["from_address"]
    if sender and sender.lower() in own:
        return _with(base, None, "our own message")
    if (noise := _not_a_response(msg, base)) is not None:
        return _with(base, None, noise)

    text = new_text(_body_text(msg))
    subject = base["subject"]
    auto = _auto_reply_reason(msg, subject, text)
    if auto is not None:
        reference = base["sent_at"] or received_at
        back = parse_return_date(f"{subject}\n{text}", reference.date() if reference else None)
        return _with(base, EventKind.auto_replied, auto, detail=back.isoformat() if back else None, return_date=back)
    if (optout := _opt_out(subject, text)) is not None:
        return _with(base, EventKind.unsubscribed, f"opt-out by reply: {optout!r}")
    if not sender:
        return _with(base, None, "no sender address")
    return _with(base, EventKind.replied, "reply from a person")


def _with(base: dict, kind: EventKind | None, reason: str, **extra: object) -> Classification:
    return Classification(kind=kind, reason=reason, **base, **extra)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- headers


def _header(msg: Message, name: str) -> str:
    """A header as text: RFC 2047 decoded, unfolded, never raising."""
    value = msg.get(name)
    if value is None:
        return ""
    try:
        text = str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:  # noqa: BLE001 - unknown charset, broken encoded word
        text = str(value)
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return re.sub(r"\s+", " ", text).strip()


_MSGID = re.compile(r"<[^<>\s]+>")


def _msgids(value: str) -> tuple[str, ...]:
    found = _MSGID.findall(value or "")
    if not found and value and "@" in value and " " not in value.strip():
        found = [f"<{value.strip().strip('<>')}>"]  # a bare id without brackets
    return tuple(found)


def _address(value: str) -> str | None:
    try:
        _, addr = email.utils.parseaddr(value)
    except Exception:  # noqa: BLE001
        return None
    addr = addr.strip().strip("<>")
    return addr if _ADDR.fullmatch(addr) else None


_ADDR = re.compile(r"[^@\s<>()\[\],;:\"]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")


def _sent_at(value: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _ids(msg: Message, received_at: datetime | None) -> dict:
    ids = _msgids(_header(msg, "Message-ID"))
    in_reply_to = _msgids(_header(msg, "In-Reply-To"))
    return {
        "message_id": ids[0] if ids else None,
        "in_reply_to": in_reply_to[0] if in_reply_to else None,
        "references": _msgids(_header(msg, "References"))[-50:],
        "from_address": _address(_header(msg, "From")),
        "subject": _header(msg, "Subject")[:500],
        "sent_at": _sent_at(_header(msg, "Date")),
    }


# --------------------------------------------------------------------------- body text


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except (LookupError, TypeError):
        return payload.decode("latin-1", "replace")


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)
_BLOCK = re.compile(r"<\s*(br|/p|/div|/tr|/li|p|div|tr|li|blockquote|/blockquote)\b[^>]*>", re.I)


def html_to_text(markup: str) -> str:
    """Just enough of HTML to read a reply: line breaks kept, tags dropped, entities decoded."""
    markup = re.sub(r"<blockquote\b.*?</blockquote\s*>", "\n", markup, flags=re.S | re.I)  # quoted original
    markup = _BLOCK.sub("\n", markup)
    text = html.unescape(_TAG.sub("", markup))
    return text.replace("\xa0", " ")


def _body_text(msg: Message) -> str:
    """The first text part of the message itself (never of an attached message)."""
    plain: str | None = None
    rich: str | None = None
    stack = [msg]
    while stack:
        part = stack.pop(0)
        ctype = part.get_content_type()
        if part.is_multipart():
            if ctype == "message/rfc822" and part is not msg:
                continue
            payload = part.get_payload()
            stack[0:0] = [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []
            continue
        if (part.get("Content-Disposition") or "").lower().startswith("attachment"):
            continue
        if ctype == "text/plain" and plain is None:
            plain = _decoded(part)
        elif ctype == "text/html" and rich is None:
            rich = _decoded(part)
        if plain is not None:
            break
    if plain is not None and plain.strip():
        return plain
    return html_to_text(rich) if rich else (plain or "")


_QUOTE_HEADERS = [
    re.compile(p, re.I | re.M)
    for p in (
        r"^\s*On\b[^\n]{0,200}(?:\n[^\n]{0,200}){0,2}?\bwrote\s*:?[ \t]*$",
        r"^\s*Le\b[^\n]{0,200}(?:\n[^\n]{0,200}){0,2}?\ba\s+[ée]crit\s*:?[ \t]*$",
        r"^\s*Am\b[^\n]{0,200}(?:\n[^\n]{0,200}){0,2}?\bschrieb\b[^\n]*$",
        r"^\s*-{2,}\s*(Original Message|Message d'origine|Message original|Urspr[üu]ngliche Nachricht|Forwarded message|Message transf[ée]r[ée])\s*-{2,}",
        r"^\s*_{10,}\s*$",  # Outlook's rule above the quoted header block
        r"^\s*(From|De)\s*:.*\n\s*(Sent|Envoy[ée]|Date)\s*:",
    )
]


def new_text(body: str) -> str:
    """The text the person wrote: quoted lines, the quoted original and the signature cut."""
    body = body.replace("\r\n", "\n").replace("\r", "\n")
    cut = len(body)
    for pattern in _QUOTE_HEADERS:
        if (m := pattern.search(body)) is not None:
            cut = min(cut, m.start())
    body = body[:cut]
    sig = re.search(r"^-- ?$", body, re.M)
    if sig is not None:
        body = body[: sig.start()]
    return "\n".join(line for line in body.split("\n") if not line.lstrip().startswith(">")).strip()


def _fold(text: str) -> str:
    """Lower case without accents, typographic apostrophes made plain: for matching only."""
    text = unicodedata.normalize("NFKD", text.replace("’", "'").replace("‘", "'"))
    return "".join(c for c in text if not unicodedata.combining(c)).lower()


# --------------------------------------------------------------------------- complaints (ARF)


def _feedback_report(msg: Message) -> dict | None:
    report_type = (msg.get_param("report-type") or "") if msg.get_content_type() == "multipart/report" else ""
    parts = list(msg.walk())
    feedback = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    if str(report_type).lower() != "feedback-report" and feedback is None:
        return None
    recipients: list[str] = []
    if feedback is not None:
        fields = _field_blocks(feedback)
        for block in fields:
            for name in ("Original-Rcpt-To", "Removal-Recipient"):
                for value in block.get(name, []):
                    if (addr := _address(value)) and addr not in recipients:
                        recipients.append(addr)
    original = _original_headers(msg)
    if not recipients and original is not None:
        if addr := _address(_header(original, "To")):
            recipients.append(addr)
    orig_ids = _msgids(_header(original, "Message-ID")) if original is not None else ()
    return {"recipients": tuple(recipients), "original_message_id": orig_ids[0] if orig_ids else None}


# --------------------------------------------------------------------------- bounces


def _field_blocks(part: Message) -> list[dict[str, list[str]]]:
    """The header blocks of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    blocks: list[Message] = []
    if isinstance(payload, list):
        blocks = [p for p in payload if isinstance(p, Message)]
    elif isinstance(payload, str):  # some servers label a text part this way
        blocks = [email.message_from_string(chunk.strip() + "\n", policy=email.policy.compat32) for chunk in re.split(r"\n\s*\n", payload) if chunk.strip()]
    out = []
    for block in blocks:
        fields: dict[str, list[str]] = {}
        for name, value in block.items():
            fields.setdefault(_canonical(name), []).append(re.sub(r"\s+", " ", str(value)).strip())
        out.append(fields)
    return out


def _canonical(name: str) -> str:
    return "-".join(w.capitalize() for w in name.strip().split("-"))


def _original_headers(msg: Message) -> Message | None:
    """The returned original: a message/rfc822 part, or a text/rfc822-headers part."""
    for part in msg.walk():
        if part is msg:
            continue
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            text = _decoded(part)
            return email.message_from_string(text.lstrip(), policy=email.policy.compat32)
    return None


_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_CODE = re.compile(r"(?<![\d.])([45][0-5]\d)(?:[ -]|$)", re.M)
_INLINE_MSGID = re.compile(r"^\s*Message-Id:\s*(<[^<>\s]+>)", re.I | re.M)
_DAEMON = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailerdaemon|mail\.?delivery|mdaemon|bounces?|nobody)\b", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (status notification|failure|failed|has failed|problem|report)|"
    r"mail delivery (failed|failure|system)|failure notice|returned mail|returned to sender|"
    r"could not be delivered|not delivered|delivery notification|non[- ]?remis|non distribuable|"
    r"remise.{0,20}(echec|impossible)|echec de (la )?(remise|distribution)|unzustellbar|nicht zustellbar|"
    r"mail system error|permanent delivery failure|message delayed|delayed mail",
    re.I,
)
_BOUNCE_TEXT = re.compile(
    r"could not be delivered|couldn't be delivered|was not delivered|undeliverable|undelivered|"
    r"delivery (has )?failed|failed permanently|permanent (error|failure)|user unknown|unknown user|"
    r"no such (user|mailbox|recipient)|mailbox (unavailable|not found|full|is full)|recipient (rejected|unknown|address rejected)|"
    r"address rejected|does not exist|not a valid (user|recipient|mailbox)|invalid recipient|"
    r"rejected (due to|because)|exceed\w* (its |the )?(mailbox |storage )?quota|over quota|quota exceeded|"
    r"did not reach the following recipient|delivery to the following recipient|returning message to sender|"
    r"n'a pas pu etre (remis|distribue|livre)|adresse (introuvable|inconnue)|destinataire (inconnu|introuvable)|"
    r"boite (aux lettres )?pleine|utilisateur (inconnu|non recense)",
    re.I,
)
_SOFT_TEXT = re.compile(
    r"mailbox (is )?full|over quota|quota|exceed\w* (its |the )?(mailbox |storage )?(size|quota|limit)|insufficient (system )?storage|"
    r"temporar\w*|try again later|will (be )?retr|still being retried|not yet been delivered|has been delayed|"
    r"message delayed|delayed|greylist|boite (aux lettres )?pleine|echec temporaire|nouvel essai",
    re.I,
)


def _bounce(msg: Message) -> dict | None:
    """A delivery failure: DSN fields first, flufl.bounce's detectors, then the daemon's words."""
    is_report = msg.get_content_type() == "multipart/report" and str(msg.get_param("report-type") or "").lower() in (
        "delivery-status", ""
    )
    parts = list(msg.walk())
    dsn_parts = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    dsn: list[dict[str, list[str]]] = []
    for part in dsn_parts:
        dsn.extend(_field_blocks(part))
    failing = [b for b in dsn if _first(b, "Action").lower().split(" ")[0] in ("failed", "delayed")]
    temporary, permanent = _flufl(msg)
    text = _body_text(msg)
    folded_text = _fold(text[:6000])
    subject = _fold(_header(msg, "Subject"))
    sender = _header(msg, "From")
    sender_addr = _address(sender) or ""
    daemon = bool(_DAEMON.match(sender_addr)) or "mail delivery" in _fold(sender) or _header(msg, "Return-Path") == "<>"
    if not (temporary or permanent or failing):
        if dsn and not failing:
            return None  # a success report (delivered, relayed, expanded): nothing failed
        # A delivery report leads with its verdict: look at its first lines only.
        opening = "\n".join([line for line in folded_text.split("\n") if line.strip()][:3])
        if not (
            (is_report and dsn_parts)
            or (daemon and (_BOUNCE_SUBJECT.search(subject) or _BOUNCE_TEXT.search(opening)))
            or (_BOUNCE_SUBJECT.search(subject) and _BOUNCE_TEXT.search(folded_text) and not _msgids(_header(msg, "In-Reply-To")))
        ):
            return None
    # Addresses: the detectors', else the DSN's Final-/Original-Recipient.
    addresses = [a for a in sorted(permanent | temporary) if _ADDR.fullmatch(a)]
    if not addresses:
        for block in failing or dsn:
            for name in ("Final-Recipient", "Original-Recipient"):
                value = _first(block, name)
                addr = value.split(";", 1)[-1].strip().strip("<>") if value else ""
                if _ADDR.fullmatch(addr) and addr not in addresses:
                    addresses.append(addr)
                    break
    blocks = [b for b in failing if _recipient_of(b) in {a.lower() for a in addresses}] or failing
    status = next((s for b in blocks if (s := _status_of(b))), None)
    diagnostic = next((_first(b, "Diagnostic-Code") for b in blocks if _first(b, "Diagnostic-Code")), None)
    delayed = bool(blocks) and all(_first(b, "Action").lower().startswith("delayed") for b in blocks)
    if status is None:
        m = _STATUS.search(text[:6000])
        status = ".".join(m.groups()) if m else None
    if diagnostic is None:
        diagnostic = _diagnostic_line(text)
    soft = _is_soft(status, delayed, temporary, permanent, folded_text, subject)
    original = _original_headers(msg)
    orig_ids = _msgids(_header(original, "Message-ID")) if original is not None else ()
    if not orig_ids:
        own = set(_msgids(_header(msg, "Message-ID")))
        orig_ids = tuple(m for m in _INLINE_MSGID.findall(text) if m not in own)
    words = "delayed" if delayed else ("temporary failure" if soft else "permanent failure")
    reason = f"{words}: {status or 'no status'}" + (f" ({diagnostic})" if diagnostic else "")
    return {
        "reason": reason[:300],
        "detail": "soft" if soft else "hard",
        "status": status,
        "diagnostic": diagnostic[:500] if diagnostic else None,
        "recipients": tuple(addresses),
        "original_message_id": orig_ids[0] if orig_ids else None,
    }


def _flufl(msg: Message) -> tuple[set[str], set[str]]:
    """flufl.bounce's (temporary, permanent) addresses; a detector crash counts as nothing found."""
    from flufl.bounce import all_failures  # imported on first use: it loads 17 detector modules

    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # noqa: BLE001 - its heuristics choke on some broken messages
        log.debug("flufl.bounce failed: %s", exc)
        return set(), set()

    def text(values: Iterable[bytes | str]) -> set[str]:
        return {(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).strip().strip("<>") for v in values}

    return text(temporary), text(permanent)


def _first(block: dict[str, list[str]], name: str) -> str:
    values = block.get(name)
    return values[0] if values else ""


def _recipient_of(block: dict[str, list[str]]) -> str:
    value = _first(block, "Final-Recipient") or _first(block, "Original-Recipient")
    return value.split(";", 1)[-1].strip().strip("<>").lower()


def _status_of(block: dict[str, list[str]]) -> str | None:
    m = _STATUS.search(_first(block, "Status"))
    return ".".join(m.groups()) if m else None


def _diagnostic_line(text: str) -> str | None:
    for line in text.split("\n")[:80]:
        stripped = line.strip()
        if stripped and (_SMTP_CODE.search(stripped) or _BOUNCE_TEXT.search(_fold(stripped))):
            return stripped[:300]
    return None


def _is_soft(
    status: str | None, delayed: bool, temporary: set[str], permanent: set[str], text: str, subject: str
) -> bool:
    """Soft means the address may still be good: a delay, a full mailbox (X.2.2, which RFC 3463
    calls a persistent transient failure), or what flufl.bounce deems temporary. A server
    that gave up after retrying (Action: failed, even with a 4.x.x status) is permanent, as
    Mailman has long judged it."""
    if delayed:
        return True
    if status and status.split(".")[1:] == ["2", "2"]:
        return True
    if temporary or permanent:
        return bool(temporary) and not permanent
    if status:
        return status.startswith("4")
    return bool(_SOFT_TEXT.search(subject) or _SOFT_TEXT.search("\n".join(text.split("\n")[:15])))


# --------------------------------------------------------------------------- not a response


def _not_a_response(msg: Message, base: dict) -> str | None:
    if _header(msg, "X-Spam-Flag").lower().startswith("yes"):
        return "flagged as spam"
    ctype = msg.get_content_type()
    report_type = str(msg.get_param("report-type") or "").lower() if ctype == "multipart/report" else ""
    if report_type == "disposition-notification":
        return "read receipt (MDN)"
    if report_type == "delivery-status":
        return "delivery report without a failure"  # delivered, relayed, expanded
    threaded = base["in_reply_to"] or base["references"]
    if (msg.get("List-Id") or msg.get("List-Unsubscribe") or msg.get("List-Post")) and not threaded:
        return "mailing-list or newsletter message"
    return None


# --------------------------------------------------------------------------- auto-replies

# An auto-reply's subject starts with what it is, then a colon or nothing: "Réponse automatique :
# <our subject>", "Out of Office: ...", "Abwesenheitsnotiz: ...", "[Auto-Reply] ...". Anchored so a
# person's "Re: automatic reply handling" stays a reply.
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:[\[(]\s*(?:auto|ooo|out of (?:the )?office|absence|absent)[^\])]*[\])]|"
    r"(?:auto(?:matic|matische|matique)?[ -]?(?:reply|replied|response|answer|antwort|reponse)|autoreply|autoresponse|"
    r"out of (?:the )?office(?: auto ?reply)?|ooo|absen(?:ce|t|te)(?: du bureau)?|je suis absente?|"
    r"reponse automatique|message automatique|abwesenheit(?:snotiz)?|respuesta automatica|risposta automatica|"
    r"(?:on )?vacation|en conges|conges)\s*(?:[:\-\u2013]|$|\())",
    re.I,
)


# Out-of-office systems that set no header still open with the same sentence.
_AWAY_TEXT = re.compile(
    r"\b((i am|i'm|i will be|i'll be) (currently |now )?(out of (the )?office|away from (the|my) (office|desk)|"
    r"on (annual |parental |maternity |sick )?leave|on (vacation|holiday)|out of the country)|"
    r"je suis (actuellement |en ce moment )?(absente?|en conges|en vacances|hors du bureau|en deplacement)|"
    r"je serai absente?|je suis en conges|ich bin (derzeit |zurzeit )?(nicht im buro|abwesend|im urlaub))"
)


def _auto_reply_reason(msg: Message, subject: str, text: str) -> str | None:
    auto_submitted = _header(msg, "Auto-Submitted").lower()
    if auto_submitted and not auto_submitted.startswith("no"):
        return f"Auto-Submitted: {auto_submitted}"
    for name in ("Precedence", "X-Precedence"):
        value = _header(msg, name).lower()
        if value in ("auto_reply", "bulk", "junk"):
            return f"{name}: {value}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Autogenerated"):
        value = _header(msg, name).lower()
        if value and value not in ("no", "false", "0"):
            return f"{name}: {value}"
    bare = re.sub(r"^\s*((re|fwd?|tr|aw|wg)\s*:\s*)+", "", _fold(subject))
    if _AUTO_SUBJECT.match(bare):
        return f"out-of-office subject: {subject[:80]!r}"
    if len(text) < 1500 and (m := _AWAY_TEXT.search(_fold(text[:400]))):
        return f"out-of-office text: {m.group(0)!r}"
    return None


# --------------------------------------------------------------------------- return dates

_MONTHS = {
    # French
    "janvier": 1, "janv": 1, "fevrier": 2, "fevr": 2, "fev": 2, "mars": 3, "avril": 4, "avr": 4, "mai": 5,
    "juin": 6, "juillet": 7, "juil": 7, "aout": 8, "septembre": 9, "octobre": 10, "novembre": 11, "decembre": 12,
    # English
    "january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4, "may": 5,
    "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9, "sept": 9, "sep": 9,
    "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12, "dec": 12,
}
_WEEKDAYS = {
    "lundi": 0, "mardi": 1, "mercredi": 2, "jeudi": 3, "vendredi": 4, "samedi": 5, "dimanche": 6,
    "monday": 0, "tuesday": 1, "wednesday": 2, "thursday": 3, "friday": 4, "saturday": 5, "sunday": 6,
    "mon": 0, "tue": 1, "tues": 1, "wed": 2, "thu": 3, "thur": 3, "thurs": 3, "fri": 4, "sat": 5, "sun": 6,
}
_MONTH = "(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_WEEKDAY = "(?:" + "|".join(sorted(_WEEKDAYS, key=len, reverse=True)) + r")\.?,?"
_DAY = r"(?P<day>[0-3]?\d)(?:er|st|nd|rd|th|e)?"
_YEAR = r"(?:,?\s+(?P<year>(?:19|20)\d\d))?"
_DATE_FORMS = [
    ("iso", re.compile(r"\b(?P<year>20\d\d)-(?P<month>[01]?\d)-(?P<day>[0-3]?\d)\b")),
    ("numeric", re.compile(r"\b(?P<a>[0-3]?\d)[/.](?P<b>[01]?\d)(?:[/.](?P<year>(?:20)?\d\d))?(?![\d/:])")),
    ("day-month", re.compile(rf"\b(?:{_WEEKDAY}\s+)?(?:the\s+)?{_DAY}(?:\s+of)?\s+{_MONTH}{_YEAR}\b")),
    ("month-day", re.compile(rf"\b(?:{_WEEKDAY}\s+)?{_MONTH}\s+(?:the\s+)?{_DAY}\b{_YEAR}")),
    ("weekday", re.compile(r"\b(?P<weekday>" + "|".join(sorted(_WEEKDAYS, key=len, reverse=True)) + r")\b")),
    ("tomorrow", re.compile(r"\b(demain|tomorrow)\b")),
]
# What precedes a date says what it means: the first day back, or the last day away.
_BACK = re.compile(
    r"(de retour|retour|serai (la|present|presente|disponible|joignable|au bureau)|reprendrai|reprise|a partir du|"
    r"a compter du|des le|back|return|returns|returning|will be (in|available|reachable)|in the office|"
    r"available (again )?(on|from))\W+(\w+\W+){0,4}$"
)
_UNTIL = re.compile(
    r"((jusqu' ?(au|a)|jusqu au|jusque|until|till|through|thru)\W+(\w+\W+){0,2}|"
    r"\b(au|to|a)\s+(le\s+)?|\s[-\u2013]\s*)$"
)


def parse_return_date(text: str, reference: date | None) -> date | None:
    """The day an absent person is back, from the words of an out-of-office, or None.

    "de retour le 12 mars" and "back on March 12" give that day; "absent jusqu'au 3/04" and
    "out until Friday" give the day after (the last day away is still away). A date without
    a year is the next one from `reference` (the message's date); numbers read day first,
    except in English text when only month first makes sense.
    """
    folded = _fold(text)[:5000]
    english = len(re.findall(r"\b(the|back|office|until|will|and|on)\b", folded)) > len(
        re.findall(r"\b(le|de|du|au|suis|serai|et|jusqu)\b", folded)
    )
    best: date | None = None
    taken: list[tuple[int, int]] = []
    for form, pattern in _DATE_FORMS:
        for m in pattern.finditer(folded):
            if any(s < m.end() and m.start() < e for s, e in taken):
                continue
            before = folded[max(0, m.start() - 60) : m.start()]
            until = _UNTIL.search(before)
            back = _BACK.search(before)
            if not until and not back:
                continue
            day = _resolve(form, m, reference, english)
            if day is None:
                continue
            taken.append((m.start(), m.end()))
            # The nearer trigger wins: "back on Monday" vs "from the 3rd to the 12th".
            if until and (not back or until.start() > back.start()):
                day += timedelta(days=1)
            if reference is not None and not (reference - timedelta(days=2) <= day <= reference + timedelta(days=366)):
                continue
            best = day if best is None or day > best else best
    return best


def _resolve(form: str, m: re.Match[str], reference: date | None, english: bool) -> date | None:
    groups = m.groupdict()
    if form == "tomorrow":
        return reference + timedelta(days=1) if reference else None
    if form == "weekday":
        if reference is None:
            return None
        ahead = (_WEEKDAYS[groups["weekday"]] - reference.weekday()) % 7 or 7
        return reference + timedelta(days=ahead)
    year = int(groups["year"]) if groups.get("year") else None
    if year is not None and year < 100:
        year += 2000
    if form == "numeric":
        a, b = int(groups["a"]), int(groups["b"])
        options = [(b, a)] if not english else [(a, b), (b, a)]  # (month, day)
        candidates = [d for mm, dd in options if (d := _make(year, mm, dd, reference)) is not None]
        if not candidates:
            return None
        if reference is None:
            return candidates[0]
        return min(candidates, key=lambda d: (d < reference, abs((d - reference).days)))
    month = _MONTHS.get(groups["month"]) if form != "iso" else int(groups["month"])
    return _make(year, month, int(groups["day"]), reference) if month else None


def _make(year: int | None, month: int, day: int, reference: date | None) -> date | None:
    if year is None:
        if reference is None:
            return None
        year = reference.year
        try:
            candidate = date(year, month, day)
        except ValueError:
            return None
        if candidate < reference - timedelta(days=31):  # "back on January 5" written in December
            candidate = _make(year + 1, month, day, None) or candidate
        return candidate
    try:
        return date(year, month, day)
    except ValueError:
        return None


# --------------------------------------------------------------------------- opt-out by reply

_OPT_OUT = re.compile(
    r"\b(unsubscribe|unsub|remove me|take me off|opt[ -]?out|"
    r"(stop|quit) (emailing|e-mailing|mailing|contacting|writing|sending|spamming|messaging)|"
    r"(do not|don't|dont|never) (contact|email|e-mail|write to|message) (me|us)( again)?|"
    r"no (more|further) (emails|e-mails|messages|contact)|"
    r"desinscri\w*|desabonn\w*|desinscription|"
    r"ne (plus|pas) me (contacter|solliciter|relancer|recontacter|ecrire|envoyer)|"
    r"ne (me|nous) (contactez|sollicitez|relancez|recontactez|ecrivez) (plus|pas)|"
    r"(retirez|supprimez|enlevez|rayez)[- ]moi|me (retirer|supprimer|enlever|rayer) de|"
    r"(ne|n') ?(souhaite|veux|desire) (plus|pas) (etre (contacte|sollicite|relance)|recevoir)|arretez de me)\b"
)
_STOP_LINE = re.compile(r"^\W*(stop|arret|arretez|unsubscribe|desinscription)\b[\w\s,!.]{0,30}$")


def _opt_out(subject: str, text: str) -> str | None:
    """An explicit request not to be contacted, in the reply's own words."""
    folded = _fold(text)[:3000]
    if m := _OPT_OUT.search(folded):
        return m.group(0)
    lines = [line for line in folded.split("\n") if line.strip()]
    if lines and len(lines) <= 4 and _STOP_LINE.match(lines[0].strip()):
        return lines[0].strip()
    bare = re.sub(r"^\s*((re|fwd?|tr|aw)\s*:\s*)+", "", _fold(subject)).strip()
    if _STOP_LINE.match(bare) and len(bare) <= 30:
        return bare
    return None

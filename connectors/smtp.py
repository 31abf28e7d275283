"""SMTP sending from each sender's own mailbox, with optional DKIM signing.

One connection per mailbox per batch (opening one per message is slow and looks like spam
to the receiving side), the SMTP dialogue driven step by step so every reply maps to a typed
error for its own touch: a 5xx refusal is terminal (a hard bounce at send time when it is
the recipient), a 4xx or a dropped connection is transient. Plain SMTP cannot dedupe, so a
connection lost after the message was handed over is never retried blindly: that touch's
outcome is unknown and a person decides (DESIGN.md section 8).

Responses come back through IMAP: `poll` hands the mailboxes with `imap` settings to
connectors.imap.

config.yaml:

    connectors:
      email:
        use: smtp
        settings:
          dkim:                                  # optional; mail from other domains goes unsigned
            - {domain: acme-finance.example, selector: relance1, private_key_path: secrets/dkim.pem}
    senders:
      sales-fr:
        - email: marie.dupont@acme-finance.example
          name: Marie Dupont
          smtp: {host: smtp.acme-finance.example, port: 587, security: starttls,
                 username: marie.dupont@acme-finance.example, password_env: SMTP_PASSWORD_MARIE}
"""

from __future__ import annotations

import os
import re
import smtplib
import ssl
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.mail_secrets import server_password
from relance.channels import BaseConnector, Capability, InboundEvent, OutboundTouch, SendResult, register
from relance.config import Mailbox, MailServer
from relance.email_message import build_email
from relance.errors import Bounced, ConfigError, OutcomeUnknown, RelanceError, TerminalError, TransientError
from relance.events import Channel

__all__ = ["DeliveryUnknown", "DkimKey", "RecipientRefused", "SmtpEmail", "SmtpSettings", "dkim_sign"]

# Signed whenever present; RFC 8058 section 4 requires both List-Unsubscribe headers.
SIGNED_HEADERS = (
    "From", "To", "Subject", "Date", "Message-ID", "In-Reply-To", "References",
    "List-Unsubscribe", "List-Unsubscribe-Post", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
)
# Signed once more than they occur, so a relay that adds one (a second From, an unsubscribe
# link of its own) breaks the signature instead of riding on it (RFC 6376 section 8.15).
OVERSIGNED_HEADERS = ("From", "To", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post")

_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_ENHANCED = re.compile(r"[245]\.(\d{1,3}\.\d{1,3})\b")  # RFC 3463 status code at the start of a reply
# 5xx replies whose RFC 3463 detail names a passing condition: a full mailbox (X.2.2), and
# congestion (X.4.5), which Gmail sends as "550 5.4.5 Daily user sending limit exceeded".
_PASSING_5XX = frozenset({"2.2", "4.5"})


class DkimKey(BaseModel):
    """A DKIM key for one sending domain; its public half is published at
    `<selector>._domainkey.<domain>`. The private key lives in a file or an environment
    variable, never in config.yaml."""

    model_config = ConfigDict(extra="forbid")

    domain: str  # d=; signs mail whose From domain is this domain or one of its subdomains
    selector: str
    private_key_path: str | None = None  # PEM (PKCS#1 or PKCS#8), relative to the workspace root
    private_key_env: str | None = None  # or the PEM text in this environment variable

    @field_validator("domain", "selector")
    @classmethod
    def _label(cls, value: str) -> str:
        value = value.strip().strip(".").lower()
        if not value or not re.fullmatch(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?", value):
            raise ValueError(f"{value!r} is not a DNS name")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> "DkimKey":
        if (self.private_key_path is None) == (self.private_key_env is None):
            raise ValueError("give exactly one of private_key_path and private_key_env")
        return self


class SmtpSettings(BaseModel):
    """`connectors.email.settings` for `use: smtp`; the servers themselves are per mailbox."""

    model_config = ConfigDict(extra="forbid")

    # A relay (smarthost) for the mailboxes that have no `smtp` of their own.
    relay: MailServer | None = None
    helo_hostname: str | None = None  # EHLO name; None lets smtplib use this machine's FQDN
    tls_ca_file: str | None = None  # PEM bundle trusted instead of the system store (a private relay)
    # Some servers cap messages per connection; reconnect before reaching it. None: no cap.
    messages_per_connection: int | None = Field(default=None, ge=1)
    dkim: list[DkimKey] = []

    @field_validator("dkim", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("dkim")
    @classmethod
    def _unique_domains(cls, value: list[DkimKey]) -> list[DkimKey]:
        domains = [k.domain for k in value]
        duplicates = sorted({d for d in domains if domains.count(d) > 1})
        if duplicates:
            raise ValueError(f"more than one DKIM key for {', '.join(duplicates)}")
        return value


class RecipientRefused(Bounced):
    """The server refused the recipient with a 5xx: a hard bounce at send time."""

    def __init__(self, message: str, *, recipient: str, code: int, text: str):
        super().__init__(message, hard=True)
        self.recipient, self.code, self.text = recipient, code, text


class DeliveryUnknown(OutcomeUnknown):
    """The connection was lost after the message was handed over: the server may have
    accepted it. Resending could deliver it twice, so a person checks first."""


@dataclass(frozen=True, slots=True)
class _Route:
    """Where one mailbox's mail goes, and the config key to name when that is wrong."""

    server: MailServer
    key: str


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """One message ready for the wire, with its envelope."""

    touch: OutboundTouch
    raw: bytes
    message_id: str
    mail_from: str  # the mailbox itself: bounces come back to the inbox IMAP reads
    rcpt_to: str


class _Reply(Exception):
    """An SMTP reply other than the one expected at this stage of one message."""

    def __init__(self, stage: str, code: int, text: str):
        super().__init__(f"{stage}: {code} {text}")
        self.stage, self.code, self.text = stage, code, text


class _Lost(Exception):
    """The connection is gone; `handed_over` when the message was fully sent before it went."""

    def __init__(self, reason: str, *, handed_over: bool = False):
        super().__init__(reason)
        self.handed_over = handed_over


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return " ".join(text.split())


def _dkim_key_for(keys: Sequence[DkimKey], address: str) -> int | None:
    """The key whose domain is the From domain or its nearest parent (DMARC relaxed alignment)."""
    domain = address.rpartition("@")[2].lower().rstrip(".")
    best: int | None = None
    for i, key in enumerate(keys):
        if domain == key.domain or domain.endswith("." + key.domain):
            if best is None or len(key.domain) > len(keys[best].domain):
                best = i
    return best


def dkim_sign(raw: bytes, *, domain: str, selector: str, private_key: bytes) -> bytes:
    """`raw` with a DKIM-Signature header on top (relaxed/relaxed, rsa-sha256)."""
    import dkim  # only when a key is configured

    present = {name.lower() for name in _header_names(raw)}
    include = [h for h in SIGNED_HEADERS if h.lower() in present] + list(OVERSIGNED_HEADERS)
    signature = dkim.sign(
        raw,
        selector.encode("ascii"),
        domain.encode("ascii"),
        private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[h.lower().encode("ascii") for h in include],
        linesep=b"\r\n",
    )
    return signature + raw


def _header_names(raw: bytes) -> Iterable[str]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line and line[:1] not in (b" ", b"\t") and b":" in line:
            yield line.split(b":", 1)[0].decode("ascii", "replace").strip()


@register
class SmtpEmail(BaseConnector):
    """Email through each mailbox's SMTP server (or a relay). Not idempotent: an SMTP server
    remembers nothing, so the engine never resends a touch whose fate is unknown."""

    name: ClassVar[str] = "smtp"
    channel: ClassVar[Channel] = Channel.email
    settings_model: ClassVar[type[BaseModel]] = SmtpSettings
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.polling})
    max_batch: ClassVar[int | None] = 100  # one message at a time: a call ends well inside a lease
    settings: SmtpSettings

    def __init__(self, settings: BaseModel, *, workspace: Any = None):
        super().__init__(settings, workspace=workspace)
        self._tls: ssl.SSLContext | None = None
        self._keys: dict[int, bytes] = {}

    # ---------------------------------------------------------------- config
    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        root = getattr(self.workspace, "root", None)
        return path if path.is_absolute() or root is None else Path(root) / path

    def _mailboxes(self) -> list[tuple[str, Mailbox]]:
        """(config key, mailbox) for every sender in config.yaml; none without a workspace."""
        config = getattr(self.workspace, "config", None)
        if config is None:
            return []
        return [(f"senders.{pool}[{i}]", box) for pool, boxes in config.senders.items() for i, box in enumerate(boxes)]

    def _route(self, address: str) -> _Route:
        boxes = self._mailboxes()
        found = next(((key, box) for key, box in boxes if box.email.lower() == address.lower()), None)
        if found is not None and found[1].smtp is not None:
            return _Route(found[1].smtp, f"{found[0]}.smtp")
        if self.settings.relay is not None and (found is not None or not boxes):
            return _Route(self.settings.relay, "connectors.email.settings.relay")
        if found is None:
            raise TerminalError(f"sender {address!r} is not a mailbox of config.yaml's senders")
        raise TerminalError(
            f"{found[0]}.smtp: mailbox {address} has no SMTP server (host, port, security, username, "
            "password_env), and connectors.email.settings.relay is not set"
        )

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            cafile = str(self._path(self.settings.tls_ca_file)) if self.settings.tls_ca_file else None
            try:
                self._tls = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                raise TerminalError(f"connectors.email.settings.tls_ca_file: cannot load {cafile}: {exc}") from None
        return self._tls

    def _dkim_key(self, index: int) -> bytes:
        if index not in self._keys:
            key = self.settings.dkim[index]
            where = f"connectors.email.settings.dkim[{index}]"
            if key.private_key_env:
                text = os.environ.get(key.private_key_env)
                if text is None:
                    raise TerminalError(f"{where}.private_key_env: environment variable {key.private_key_env} is not set")
                pem = text.encode("ascii", "replace")
            else:
                path = self._path(key.private_key_path or "")
                try:
                    pem = path.read_bytes()
                except OSError as exc:
                    raise TerminalError(f"{where}.private_key_path: cannot read {path}: {exc.strerror or exc}") from None
            from dkim.crypto import UnparsableKeyError, parse_pem_private_key

            try:
                parse_pem_private_key(pem)
            except (UnparsableKeyError, ValueError, IndexError) as exc:
                raise TerminalError(f"{where}: not a PEM RSA private key ({exc})") from None
            self._keys[index] = pem
        return self._keys[index]

    # ------------------------------------------------------------------ send
    def send_batch(self, touches: Sequence[OutboundTouch], now: datetime) -> list[SendResult]:
        """Every touch of one mailbox goes over one connection; results keep the input order."""
        results: dict[int, SendResult] = {}
        groups: dict[str, list[_Outgoing]] = {}
        routes: dict[str, _Route] = {}
        for touch in touches:
            try:
                if touch.channel != Channel.email:
                    raise TerminalError(f"smtp connector got a {touch.channel!s} touch")
                address = touch.sender.address
                if address not in routes:
                    routes[address] = self._route(address)
                outgoing = self._message(touch, now)
            except TerminalError as exc:
                results[touch.touch_id] = SendResult(touch.touch_id, error=exc)
                continue
            groups.setdefault(address, []).append(outgoing)
        for address, items in groups.items():
            _MailboxSession(self, routes[address]).send(items, results)
        return [results[t.touch_id] for t in touches]

    def _message(self, touch: OutboundTouch, now: datetime) -> _Outgoing:
        msg = build_email(touch, date=now)
        # The envelope takes the addresses as the headers carry them: validated, IDNA domains.
        mail_from, rcpt_to = (msg[h].addresses[0].addr_spec for h in ("From", "To"))
        raw = msg.as_bytes()
        index = _dkim_key_for(self.settings.dkim, mail_from)
        if index is not None:
            key = self.settings.dkim[index]
            import dkim

            try:
                raw = dkim_sign(raw, domain=key.domain, selector=key.selector, private_key=self._dkim_key(index))
            except dkim.DKIMException as exc:
                raise TerminalError(f"connectors.email.settings.dkim[{index}]: signing failed: {exc}") from None
        return _Outgoing(touch, raw, str(msg["Message-ID"]), mail_from, rcpt_to)

    # ------------------------------------------------------------------ poll
    def poll(self, now: datetime) -> list[InboundEvent]:
        """Replies, bounces and auto-replies from the inboxes of the mailboxes with `imap` set."""
        boxes = [box for _, box in self._mailboxes() if box.imap is not None]
        if not boxes:
            return []
        from connectors.imap import poll_mailboxes  # the IMAP reader, only when a mailbox has one

        tls = self._tls_context() if self.settings.tls_ca_file else None  # the same private CA as for sending
        return list(poll_mailboxes(self.workspace, boxes, now, tls=tls))


class _MailboxSession:
    """One mailbox's connection for one batch: opened on first use, reopened once if lost."""

    def __init__(self, connector: SmtpEmail, route: _Route):
        self.c = connector
        self.route = route
        self.server = route.server
        self.where = f"{self.server.host}:{self.server.port}"
        self.client: smtplib.SMTP | None = None
        self.reconnects_left = 1
        self.sent_on_connection = 0

    def send(self, items: list[_Outgoing], results: dict[int, SendResult]) -> None:
        queue = deque(items)

        def fail_rest(error: RelanceError) -> None:
            while queue:
                touch = queue.popleft().touch
                results[touch.touch_id] = SendResult(touch.touch_id, error=error)

        try:
            while queue:
                out = queue[0]
                touch = out.touch
                if self.client is None:
                    try:
                        self.client = self._open()
                    except RelanceError as exc:
                        return fail_rest(exc)
                    self.sent_on_connection = 0
                try:
                    self._transfer(out)
                except _Reply as reply:
                    queue.popleft()
                    results[touch.touch_id] = SendResult(touch.touch_id, error=self._refusal(reply, out.rcpt_to))
                    if not self._reset() and not self._may_reconnect():
                        return fail_rest(TransientError(f"SMTP {self.where}: connection lost again in this batch (after RSET)", retry_after=60.0))
                except _Lost as lost:
                    self._close()
                    if lost.handed_over:
                        queue.popleft()
                        results[touch.touch_id] = SendResult(touch.touch_id, error=DeliveryUnknown(
                            f"SMTP {self.where}: connection lost after the message to {out.rcpt_to} was handed over "
                            f"({lost}); the server may have accepted it, so it is not resent: check before resuming"
                        ))
                    # Otherwise the server never took the message: it goes again on the new connection.
                    if not self._may_reconnect():
                        return fail_rest(TransientError(f"SMTP {self.where}: connection lost again in this batch ({lost})", retry_after=60.0))
                else:
                    queue.popleft()
                    results[touch.touch_id] = SendResult(touch.touch_id, provider_message_id=out.message_id)
                    self.sent_on_connection += 1
                    limit = self.c.settings.messages_per_connection
                    if limit and self.sent_on_connection >= limit and queue:
                        self._quit()  # a planned renewal, not a loss
        finally:
            self._quit()

    def _may_reconnect(self) -> bool:
        """One reconnection per mailbox per batch: a server that keeps dropping us is down."""
        if self.reconnects_left == 0:
            return False
        self.reconnects_left -= 1
        return True

    # ------------------------------------------------------------ dialogue
    def _open(self) -> smtplib.SMTP:
        s, key = self.server, self.route.key
        password = None
        if s.username:
            try:
                password = server_password(s, key)
            except ConfigError as exc:
                raise TerminalError(exc.located()) from None
            except Exception as exc:  # noqa: BLE001 - a secret store that is down: try again later
                raise TransientError(f"{key}: cannot read the password: {exc}", retry_after=60.0) from None
            if password is None:
                raise TerminalError(f"{key}: username is set but neither password_env nor password_secret")
        context = self.c._tls_context() if s.security != "none" else None
        helo = self.c.settings.helo_hostname
        try:
            if s.security == "ssl":
                client: smtplib.SMTP = smtplib.SMTP_SSL(s.host, s.port, local_hostname=helo, timeout=s.timeout_seconds, context=context)
            else:
                client = smtplib.SMTP(s.host, s.port, local_hostname=helo, timeout=s.timeout_seconds)
            try:
                client.ehlo_or_helo_if_needed()
                if s.security == "starttls":
                    client.starttls(context=context)
                    client.ehlo()
                if s.username:
                    client.login(s.username, password or "")
            except BaseException:
                client.close()
                raise
        except smtplib.SMTPNotSupportedError as exc:
            raise TerminalError(f"{key}: {self.where}: {exc} (check security: starttls, ssl or none)") from None
        except smtplib.SMTPAuthenticationError as exc:
            message = f"{key}: {self.where} refused the login of {s.username}: {exc.smtp_code} {_text(exc.smtp_error)}"
            raise (TransientError(message, retry_after=300.0) if 400 <= exc.smtp_code < 500 else TerminalError(message)) from None
        except smtplib.SMTPServerDisconnected as exc:
            raise TransientError(f"SMTP {self.where}: connection closed while opening ({exc})", retry_after=60.0) from None
        except smtplib.SMTPResponseException as exc:
            message = f"SMTP {self.where} refused the session: {exc.smtp_code} {_text(exc.smtp_error)}"
            raise (TerminalError(f"{key}: {message}") if exc.smtp_code >= 500 else TransientError(message, retry_after=60.0)) from None
        except smtplib.SMTPException as exc:  # e.g. no authentication method in common
            raise TerminalError(f"{key}: {self.where}: {exc}") from None
        except ssl.SSLError as exc:  # a certificate or protocol mismatch does not fix itself
            raise TerminalError(
                f"{key}: TLS with {self.where} failed ({exc}); check security ({s.security}), the port, "
                "and connectors.email.settings.tls_ca_file for a private CA"
            ) from None
        except OSError as exc:  # refused, unreachable, DNS, timeout
            raise TransientError(f"SMTP {self.where}: cannot connect ({exc})", retry_after=60.0) from None
        return client

    def _transfer(self, out: _Outgoing) -> None:
        """MAIL, RCPT, DATA by hand, so a failure is known to fall before or after the
        message was handed over (smtplib.sendmail cannot say)."""
        client = self.client
        assert client is not None
        try:
            self._check("MAIL FROM", *client.mail(out.mail_from), (250,))
            self._check("RCPT TO", *client.rcpt(out.rcpt_to), (250, 251))
            self._check("DATA", *client.docmd("DATA"), (354,))
            data = _LEADING_DOT.sub(b"..", out.raw)
            if not data.endswith(b"\r\n"):
                data += b"\r\n"
            client.send(data + b".\r\n")
        except (smtplib.SMTPException, OSError) as exc:  # smtplib has closed the socket
            raise _Lost(str(exc) or type(exc).__name__) from None
        try:
            code, text = client.getreply()
        except (smtplib.SMTPException, OSError) as exc:
            raise _Lost(str(exc) or type(exc).__name__, handed_over=True) from None
        self._check("end of DATA", code, text, (250,))

    @staticmethod
    def _check(stage: str, code: int, text: bytes, expected: tuple[int, ...]) -> None:
        if code == 421:  # the server is closing the channel: nothing was taken, try a new one
            raise _Lost(f"{stage}: 421 {_text(text)}")
        if code not in expected:
            raise _Reply(stage, code, _text(text))

    def _refusal(self, reply: _Reply, recipient: str) -> RelanceError:
        message = f"SMTP {self.where} refused at {reply.stage}: {reply.code} {reply.text}"
        enhanced = _ENHANCED.match(reply.text)
        if enhanced and enhanced.group(1) in _PASSING_5XX:  # a 5xx for a condition that passes
            return TransientError(message, retry_after=3600.0)
        if 500 <= reply.code < 600:
            if reply.stage == "RCPT TO":
                return RecipientRefused(f"{message} (recipient {recipient})", recipient=recipient, code=reply.code, text=reply.text)
            return TerminalError(message)
        return TransientError(message, retry_after=300.0 if reply.code == 452 else 60.0)

    def _reset(self) -> bool:
        """After a refusal, RSET for the next message; False when the connection is gone."""
        client = self.client
        if client is None:
            return False
        try:
            code, _ = client.rset()
        except (smtplib.SMTPException, OSError):
            code = 421
        if code != 250:
            self._close()
            return False
        return True

    def _quit(self) -> None:
        if self.client is not None:
            try:
                self.client.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._close()

    def _close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

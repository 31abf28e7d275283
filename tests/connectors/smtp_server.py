"""A real SMTP server for the tests (aiosmtpd), recording everything it receives.

It can refuse chosen recipients with a chosen reply, close the connection after a number of
messages (as servers that cap messages per connection do), drop the line right after a
message was handed over, and require STARTTLS + AUTH with a self-signed certificate
generated here (`cryptography`), trusted by the client through a CA file.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.connectors.local_tls import free_port, make_certificate

USERNAME = "marie.dupont@acme-finance.example"
PASSWORD = "s3cret-Motdepasse"


@dataclass
class Received:
    """One message as it arrived: the envelope, the bytes, the connection it came over."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: Any
    login: str | None

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)  # type: ignore[return-value]


@dataclass
class Recorder:
    """The aiosmtpd handler. Replies are configured per recipient address (lower case)."""

    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> reply, e.g. "550 5.1.1 No such user"
    per_connection: int | None = None  # MAIL beyond this many on one connection gets 421 and a hang-up
    hang_up_after_data: set[str] = field(default_factory=set)  # take the message, then drop the line unanswered
    received: list[Received] = field(default_factory=list)
    ehlos: list[Any] = field(default_factory=list)  # peer of every EHLO/HELO
    lock: threading.Lock = field(default_factory=threading.Lock)
    _counts: dict[int, int] = field(default_factory=dict)

    @property
    def connections(self) -> int:
        """Client connections that said EHLO (STARTTLS makes a client say it twice on one)."""
        with self.lock:
            return len(set(self.ehlos))

    def messages(self) -> list[EmailMessage]:
        with self.lock:
            return [r.message for r in self.received]

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self.lock:
            self.ehlos.append(session.peer)
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        with self.lock:
            self.ehlos.append(session.peer)
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        with self.lock:
            n = self._counts[id(session)] = self._counts.get(id(session), 0) + 1
        if self.per_connection is not None and n > self.per_connection:
            asyncio.get_running_loop().call_soon(server.transport.close)  # after the reply is written
            return "421 4.7.0 Too many messages on this connection, closing"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.refuse.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        with self.lock:
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content, session.peer, login))
        if any(r.lower() in self.hang_up_after_data for r in envelope.rcpt_tos):
            server.transport.abort()
        return "250 2.0.0 Ok: queued"


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USERNAME and auth_data.password.decode() == PASSWORD
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)  # handled=False: the server replies 535


@dataclass
class SmtpServer:
    recorder: Recorder
    host: str
    port: int
    controller: Controller
    ca_file: Path | None = None
    security: str = "none"  # what a client must say in config.yaml: none, starttls or ssl

    def settings(self, **extra: Any) -> dict[str, Any]:
        """A MailServer mapping (config.yaml's `smtp:`) pointing here."""
        return {"host": self.host, "port": self.port, "security": self.security, "timeout_seconds": 5, **extra}

    def stop(self) -> None:
        self.controller.stop()



def start(recorder: Recorder | None = None, **smtp_kwargs: Any) -> SmtpServer:
    """Start a server on a free high port (retrying if another process took it meanwhile)."""
    recorder = recorder or Recorder()
    last: Exception | None = None
    for _ in range(5):
        port = free_port()
        controller = Controller(recorder, hostname="127.0.0.1", port=port, server_hostname="mx.test.example", ready_timeout=5, **smtp_kwargs)
        try:
            controller.start()
        except Exception as exc:  # noqa: BLE001 - port taken between probe and bind
            last = exc
            continue
        return SmtpServer(recorder, "127.0.0.1", port, controller)
    raise RuntimeError(f"could not start the SMTP test server: {last}")


def start_tls(folder: Path, recorder: Recorder | None = None, *, implicit: bool = False) -> SmtpServer:
    """STARTTLS required and AUTH required (USERNAME/PASSWORD); `implicit` for TLS from the first byte."""
    cert, key = make_certificate(folder, "SMTP")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if implicit:  # aiosmtpd cannot tell implicit TLS is TLS: auth_require_tls=False (tests filter its warning)
        server = start(recorder, ssl_context=context, auth_required=True, authenticator=authenticator, auth_require_tls=False)
    else:
        server = start(
            recorder, tls_context=context, require_starttls=True, auth_required=True, authenticator=authenticator, auth_require_tls=True
        )
    server.ca_file, server.security = cert, ("ssl" if implicit else "starttls")
    return server


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def smtp_server():
    server = start()
    yield server
    server.stop()


@pytest.fixture
def smtp_tls_server(tmp_path_factory):
    server = start_tls(tmp_path_factory.mktemp("smtp-tls"))
    yield server
    server.stop()


@pytest.fixture
def smtp_example_settings(smtp_server) -> dict[str, Any]:
    """The contract table's settings for the smtp connector: a relay pointing at a live server."""
    return {"relay": smtp_server.settings(), "helo_hostname": "relance.test"}

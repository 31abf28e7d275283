"""A local Brevo: the v3 transactional-email endpoint as Brevo documents it, on a free port.

`POST /v3/smtp/email` checks the `api-key` header, validates the body the way Brevo's API
reference describes it (sender, to, subject, textContent/htmlContent, string-valued headers,
a UUID `headers.idempotencyKey`, tags), stores each accepted message, answers 201
`{"messageId": "<...@smtp-relay.mailin.fr>"}`, and dedupes on the idempotency key for its
TTL. Errors are shaped `{"code", "message"}`. Tests script faults: the next N calls, every
k-th call or one recipient can get a 429 with Retry-After, a 5xx, a 400, a slow answer, or
"accepted, then the answer is lost" (the case the idempotency key exists for).

It can also play Brevo's side of webhooks: build real-shaped event payloads for a message it
accepted and POST them, one per call or batched, with basic or bearer authentication.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

API_KEY = "xkeysib-local-test-key"
EXAMPLE_KEY_ENV = "RELANCE_TEST_BREVO_API_KEY"
EXAMPLE_SECRET_ENV = "RELANCE_TEST_BREVO_WEBHOOK_TOKEN"
EXAMPLE_SECRET = "brevo-webhook-token"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_KNOWN_KEYS = {
    "sender", "to", "cc", "bcc", "replyTo", "subject", "htmlContent", "textContent", "headers", "tags",
    "params", "templateId", "attachment", "messageVersions", "scheduledAt", "batchId",
}
_PARIS = ZoneInfo("Europe/Paris")


@dataclass
class Fault:
    """One scripted answer. `accept` stores the message first, then answers the fault anyway."""

    status: int
    retry_after: str | None = None
    code: str | None = None
    message: str | None = None
    accept: bool = False
    delay: float = 0.0

    def body(self) -> dict[str, str]:
        default = {429: "too_many_requests", 400: "invalid_parameter", 401: "unauthorized", 403: "permission_denied"}
        return {
            "code": self.code or default.get(self.status, "internal_error"),
            "message": self.message or {429: "Too many requests"}.get(self.status, f"scripted {self.status}"),
        }


@dataclass
class Request:
    at: float
    status: int
    body: Any
    http_headers: dict[str, str]
    client_port: int
    duplicate: bool = False


@dataclass
class FakeBrevo:
    api_key: str = API_KEY
    idempotency_ttl: float = 1800.0  # Brevo's documented TTL is 30 minutes
    messages: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[str, float]] = {}
        self._next: list[Fault] = []
        self._recipients: dict[str, list[Fault | None]] = {}  # None in the list: "always this fault"
        self._every: tuple[int, Fault] | None = None
        self._counter = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ scripting
    def fail_next(self, n: int, status: int, **kwargs: Any) -> None:
        with self._lock:
            self._next.extend(Fault(status, **kwargs) for _ in range(n))

    def fail_recipient(self, email: str, status: int, *, times: int | None = None, **kwargs: Any) -> None:
        """The next `times` calls to this recipient (every call if None) get the fault."""
        with self._lock:
            fault = Fault(status, **kwargs)
            self._recipients[email.lower()] = [fault] * times if times is not None else [fault, None]

    def fail_every(self, k: int, status: int, **kwargs: Any) -> None:
        """Every k-th call (counted over all calls) gets the fault, like a shared rate limit."""
        with self._lock:
            self._every = (k, Fault(status, **kwargs))

    def clear_faults(self) -> None:
        with self._lock:
            self._next.clear()
            self._recipients.clear()
            self._every = None

    def _fault_for(self, recipient: str | None, call: int) -> Fault | None:
        with self._lock:
            planned = self._recipients.get((recipient or "").lower())
            if planned:
                fault = planned[0]
                if len(planned) == 2 and planned[1] is None:
                    return fault
                planned.pop(0)
                return fault
            if self._next:
                return self._next.pop(0)
            if self._every and call % self._every[0] == 0:
                return self._every[1]
        return None

    # ------------------------------------------------------------------ reading
    def message_for(self, touch_key: str) -> dict[str, Any]:
        found = [m for m in self.messages if m["body"]["headers"].get("X-Relance-Touch") == touch_key]
        assert len(found) == 1, f"{len(found)} messages for {touch_key!r}"
        return found[0]

    def sends_per_touch(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.messages:
            key = m["body"]["headers"].get("X-Relance-Touch", "?")
            counts[key] = counts.get(key, 0) + 1
        return counts

    # ------------------------------------------------------------------ the API
    def handle(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], Any]:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        http_headers = {k.lower(): v for k, v in handler.headers.items()}
        call = len(self.requests) + 1
        status, extra, answer, body, duplicate = self._answer(handler.path, http_headers, raw, call)
        with self._lock:
            self.requests.append(Request(time.monotonic(), status, body, http_headers, handler.client_address[1], duplicate))
        return status, extra, answer

    def _answer(self, path: str, http_headers: dict[str, str], raw: bytes, call: int):
        def error(status: int, code: str, message: str, extra: dict[str, str] | None = None):
            return status, extra or {}, {"code": code, "message": message}, body, False

        body: Any = None
        if path != "/v3/smtp/email":
            return error(404, "not_found", f"no route {path}")
        if http_headers.get("api-key") != self.api_key:
            return error(401, "unauthorized", "Key not found")
        try:
            body = json.loads(raw)
        except ValueError:
            return error(400, "bad_request", "Input must be a valid JSON object")
        if not isinstance(body, dict):
            return error(400, "bad_request", "Input must be a valid JSON object")
        recipient = None
        if isinstance(body.get("to"), list) and body["to"] and isinstance(body["to"][0], dict):
            recipient = body["to"][0].get("email")
        fault = self._fault_for(recipient, call)
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and not fault.accept:
            extra = {"retry-after": fault.retry_after} if fault.retry_after else {}
            if fault.status == 429:
                extra.update({"x-sib-ratelimit-limit": "1000", "x-sib-ratelimit-remaining": "0", "x-sib-ratelimit-reset": "1"})
            return fault.status, extra, fault.body(), body, False
        problem = validate(body)
        if problem:
            return error(400, "invalid_parameter", problem)
        key = body.get("headers", {}).get("idempotencyKey")
        with self._lock:
            now = time.monotonic()
            seen = self._by_key.get(key) if key else None
            if seen and now - seen[1] < self.idempotency_ttl:
                return 201, {}, {"messageId": seen[0]}, body, True
            message_id = f"<{datetime.now(UTC):%Y%m%d%H%M}.{next(self._counter):011d}@smtp-relay.mailin.fr>"
            self.messages.append({"messageId": message_id, "body": body, "http_headers": http_headers})
            if key:
                self._by_key[key] = (message_id, now)
        if fault:  # accepted, but the caller never learns it
            return fault.status, {}, fault.body(), body, False
        return 201, {}, {"messageId": message_id}, body, False

    # ------------------------------------------------------------------ webhooks
    def webhook_event(self, message: dict[str, Any], event: str, *, at: datetime | None = None, **extra: Any) -> dict[str, Any]:
        """A transactional webhook payload as Brevo documents it, for a message it accepted."""
        at = at or datetime.now(UTC)
        body = message["body"]
        payload = {
            "event": event,
            "email": body["to"][0]["email"],
            "id": 4242,  # the webhook's id, not the event's: Brevo gives events none
            "date": at.astimezone(_PARIS).strftime("%Y-%m-%d %H:%M:%S"),
            "ts": int(at.timestamp()),
            "message-id": message["messageId"],
            "ts_event": int(at.timestamp()),
            "subject": body["subject"],
            "sending_ip": "185.41.28.109",
            "ts_epoch": int(at.timestamp() * 1000),
            "tags": body.get("tags", []),
        }
        custom = body.get("headers", {}).get("X-Mailin-custom")
        if custom:
            payload["X-Mailin-custom"] = custom
        payload.update(extra)
        return payload

    @staticmethod
    def deliver(notify_url: str, events: list[dict[str, Any]], *, batched: bool = False, token: str | None = None) -> list[httpx.Response]:
        """POST like Brevo: credentials in the URL become Basic auth, a token becomes Bearer."""
        headers = {"content-type": "application/json", "user-agent": "sendinblue_webhook"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        bodies = [events] if batched else events
        with httpx.Client(timeout=10) as client:
            return [client.post(notify_url, content=json.dumps(b).encode(), headers=headers) for b in bodies]

    # ------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v3"

    def start(self) -> "FakeBrevo":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                status, extra, answer = fake.handle(self)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def validate(body: dict[str, Any]) -> str | None:
    """What Brevo's reference requires of a send; the first problem, or None."""
    unknown = sorted(set(body) - _KNOWN_KEYS)
    if unknown:
        return f"unknown parameters: {', '.join(unknown)}"
    sender = body.get("sender")
    if not isinstance(sender, dict) or not isinstance(sender.get("email"), str) or "@" not in sender["email"]:
        return "sender is missing or has no valid email"
    to = body.get("to")
    if not isinstance(to, list) or not to:
        return "to is missing"
    for person in to:
        if not isinstance(person, dict) or not isinstance(person.get("email"), str) or "@" not in person["email"]:
            return "email is not valid in to"
        if "name" in person and not isinstance(person["name"], str):
            return "name must be a string in to"
    if not isinstance(body.get("subject"), str) or not body["subject"].strip():
        return "subject is missing"
    if not any(isinstance(body.get(k), str) and body[k] for k in ("textContent", "htmlContent")):
        return "textContent or htmlContent is required"
    headers = body.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        return "headers must be an object of strings"
    key = headers.get("idempotencyKey")
    if key is not None and not _UUID.match(key):
        return "idempotencyKey must be a UUID"
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            return f"header {name!r} contains a line break"
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return "tags must be an array of strings"
    return None


@contextmanager
def running(**kwargs: Any) -> Iterator[FakeBrevo]:
    fake = FakeBrevo(**kwargs).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def brevo_example(monkeypatch) -> Iterator[dict[str, Any]]:
    """BrevoEmail's example_settings pointed at a fresh local Brevo, with its secrets in the
    environment: what the contract table sends through."""
    from connectors.brevo import BrevoEmail

    with running() as fake:
        monkeypatch.setenv(EXAMPLE_KEY_ENV, API_KEY)
        monkeypatch.setenv(EXAMPLE_SECRET_ENV, EXAMPLE_SECRET)
        yield {**BrevoEmail.example_settings, "base_url": fake.url}


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Run an ASGI app (the project's web app) under uvicorn on a free port; yields its URL."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


__all__ = ["API_KEY", "FakeBrevo", "Fault", "brevo_example", "running", "serve_asgi", "validate"]

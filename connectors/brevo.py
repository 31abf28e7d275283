"""Brevo (ex-Sendinblue) transactional email: send through its v3 HTTP API, hear back through
its transactional webhooks.

What Brevo documents, and what this module does with it:

- Sending: `POST {base_url}/smtp/email` with the `api-key` header and a JSON body
  `{sender, to, subject, textContent, htmlContent, headers, tags}`; success is 201 with
  `{"messageId": "<...@smtp-relay.mailin.fr>"}`; errors carry `{"code", "message"}`
  (developers.brevo.com/docs/send-a-transactional-email, /reference/send-transac-email).
  `headers` takes "custom headers (not the standard headers)", renamed to This-Case; we put
  our Message-Id, In-Reply-To, References and List-Unsubscribe(-Post) there all the same,
  since the same hygiene must hold on every connector. Whether Brevo keeps the standard ones
  is not documented (threading headers were asked for in sendinblue/APIv3-php-library#129,
  closed without an answer), so matching never depends on it (see Webhooks), and
  `threading_headers: false` drops Message-Id/In-Reply-To/References should an account
  refuse them.
- Idempotency: Brevo dedupes on `headers.idempotencyKey`, which must be a UUID and lives
  15 minutes (changelog "Email API now supports idempotency") or 30 minutes (current
  page /docs/heterogenous-versions-batch-emails). We send a UUIDv5 of our touch's
  idempotency key (with sender and recipient, so two workspaces sharing one Brevo account
  never collide), so a retry inside that window is not sent twice. Brevo does not document
  what a duplicate request answers. Because the window is bounded, this connector does NOT
  declare Capability.idempotent_send: after a crash the engine flags the touch `unknown`
  for a person instead of resending blindly hours later. The key still protects the engine's
  own retries after a timeout or a 5xx, whose first backoffs fall inside the window.
  `X-Relance-Touch` (our key, as build_email writes it) makes a resend recognisable in
  Brevo's logs either way.
- Rate limits: 429 with `x-sib-ratelimit-limit/-remaining/-reset` (reset in seconds,
  /docs/limit-headers). We honour `Retry-After` (seconds or HTTP date) first, then
  `x-sib-ratelimit-reset`; after a 429 the rest of the batch waits too instead of hammering.
  429, 408 and 5xx, timeouts and connection errors are TransientError; other 4xx are
  TerminalError with Brevo's `code` and `message`.
- Webhooks (/docs/transactional-webhooks): one JSON object per event with `event`, `email`,
  `message-id`, `date` (CET/CEST), `ts`, `ts_event` and `ts_epoch` (UTC milliseconds, the
  only reliably UTC one, as django-anymail observed), `reason` for bounces, `link` for
  clicks, `tag`/`tags`, and `X-Mailin-custom` echoing the header we set. Batched webhooks
  (/docs/batch-webhooks, `batched: true`) send several events in one call: we take a JSON
  array of those objects (the array shape is our reading; the page shows no payload).
  Event names: request, delivered, opened, unique_opened, proxy_open, unique_proxy_open,
  click, soft_bounce, hard_bounce, invalid_email, blocked, deferred, spam (and `complaint`,
  seen live by anymail), unsubscribed (`unsubscribe` per anymail), error. Brevo gives no
  event id, so the dedupe key hashes (event, message-id, email, timestamp, link).
  Events are matched by Brevo's message id (stored as the touch's provider id), by our
  Message-ID, and by our idempotency key carried in `X-Mailin-custom`.
- Webhook authentication (/docs/secured-webhooks): Brevo does not sign payloads. It offers
  IP allow-listing, basic auth (credentials in the notify URL, `https://user:pass@host/`,
  sent as `Authorization: Basic`) and a bearer token (`auth: {type, token}` on the webhook,
  /reference/create-webhook; that it arrives as `Authorization: Bearer <token>` is our
  reading of "token based header authentication"). We check one of the two, chosen by
  `webhook_auth`, against a secret from the environment, in constant time; with no secret
  configured every call is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from email.header import Header
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from relance.channels import BaseConnector, Capability, InboundEvent, OutboundTouch, SendResult, register
from relance.email_message import build_email, one_line
from relance.errors import RelanceError, TerminalError, TransientError, Unauthenticated
from relance.events import Channel, EventKind

__all__ = ["BrevoEmail", "BrevoSettings", "brevo_idempotency_key", "parse_retry_after"]

DEFAULT_BASE_URL = "https://api.brevo.com/v3"
# Fixed forever: changing it would give every in-flight touch a new Brevo idempotency key.
_KEY_NAMESPACE = uuid.UUID("6f1c3f2e-8d0a-5b8e-9a57-2f4c1b7e0d31")
_RFC5322_SPECIALS = set('()<>[]:;@\\,."')
_PARIS = ZoneInfo("Europe/Paris")  # Brevo's `date` field is CET/CEST
_MAX_RETRY_AFTER = 86_400.0  # a day: anything longer is a broken header, not advice
_MIN_EPOCH, _MAX_EPOCH = 946_684_800, 4_102_444_800  # 2000-01-01 .. 2100-01-01, seconds

# Brevo event -> (our kind, detail). The detail of a bounce must be "hard" or "soft": the rules
# suppress on anything but "soft", so a deferral is a soft bounce, never its own detail.
EVENTS: dict[str, tuple[EventKind, str | None]] = {
    "request": (EventKind.queued, None),
    "sent": (EventKind.queued, None),
    "delivered": (EventKind.delivered, None),
    "opened": (EventKind.opened, None),
    "unique_opened": (EventKind.opened, "first"),
    "proxy_open": (EventKind.opened, "proxy"),
    "unique_proxy_open": (EventKind.opened, "proxy"),
    "click": (EventKind.clicked, None),
    "soft_bounce": (EventKind.bounced, "soft"),
    "deferred": (EventKind.bounced, "soft"),
    "hard_bounce": (EventKind.bounced, "hard"),
    "invalid_email": (EventKind.bounced, "hard"),
    "blocked": (EventKind.bounced, "hard"),  # Brevo refused: the address is on its blocklist
    "spam": (EventKind.complained, None),
    "complaint": (EventKind.complained, None),
    "unsubscribed": (EventKind.unsubscribed, None),
    "unsubscribe": (EventKind.unsubscribed, None),
    # Brevo could not hand the message over (its own failure, not the recipient's): the send
    # failed, as reports count it; the cadence goes on.
    "error": (EventKind.failed, "provider error"),
}
# Documented events that say nothing about a message: accepted and dropped, not an error.
IGNORED_EVENTS = frozenset({"list_addition"})


class BrevoSettings(BaseModel):
    """Secrets are named, never written: the API key and the webhook secret come from the
    environment at the moment they are needed, so loading a workspace never fails on them."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "BREVO_API_KEY"
    webhook_auth: Literal["bearer", "basic"] = "bearer"
    # bearer: the token set on the Brevo webhook; basic: "user:password" from the notify URL.
    webhook_secret_env: str = "BREVO_WEBHOOK_SECRET"
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    threading_headers: bool = True  # Message-Id, In-Reply-To, References in Brevo's `headers`
    tags: list[str] = Field(default_factory=lambda: ["relance"])

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
        return value

    @field_validator("api_key_env", "webhook_secret_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not value or not value.replace("_", "").isalnum():
            raise ValueError(f"{value!r} is not an environment variable name (the secret itself never goes in config.yaml)")
        return value


def brevo_idempotency_key(touch: OutboundTouch) -> str:
    """Brevo wants a UUID; ours is `enrollment:step`. Sender and recipient are mixed in because
    enrollment ids are per database, and one Brevo account may serve several workspaces."""
    name = "\x1f".join((touch.idempotency_key, touch.sender.address.lower(), (touch.recipient or "").lower()))
    return str(uuid.uuid5(_KEY_NAMESPACE, name))


def parse_retry_after(headers: Mapping[str, str], wall_now: datetime | None = None) -> float | None:
    """Seconds to wait: `Retry-After` (delta-seconds or HTTP date, RFC 9110 10.2.3), else
    Brevo's `x-sib-ratelimit-reset`. None when the provider said nothing usable."""
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    value = lower.get("retry-after", "").strip()
    if value:
        seconds = _seconds(value)
        if seconds is None:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None:
                when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
                base = wall_now or _server_date(lower.get("date")) or datetime.now(timezone.utc)
                seconds = max(0.0, (when - base).total_seconds())
        if seconds is not None:
            return min(seconds, _MAX_RETRY_AFTER)
    reset = _seconds(lower.get("x-sib-ratelimit-reset", "").strip())
    return min(reset, _MAX_RETRY_AFTER) if reset is not None else None


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _server_date(value: str | None) -> datetime | None:
    """The provider's own clock, so an HTTP-date Retry-After survives our clock skew."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _display_name(name: str | None) -> str | None:
    """Brevo silently drops a display name that is non-ASCII *and* has an RFC 5322 special
    (django-anymail's finding); an RFC 2047 encoded word gets through intact."""
    name = one_line(name)
    if not name:
        return None
    if not name.isascii() and any(c in _RFC5322_SPECIALS for c in name):
        return Header(name, "utf-8").encode()
    return name


def _error_reason(response: httpx.Response) -> str:
    """Brevo's `code: message`, else the start of whatever came back."""
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and (data.get("code") or data.get("message")):
        return ": ".join(str(data[k]) for k in ("code", "message") if data.get(k))
    text = one_line(response.text)[:200]
    return text or response.reason_phrase or "no detail"


@register
class BrevoEmail(BaseConnector):
    """One request per touch on a client kept for the connector's life: each touch gets its own
    idempotency key and its own outcome, and Brevo allows 1000 requests a second on this
    endpoint, so batching into messageVersions would only couple the touches' fates."""

    name: ClassVar[str] = "brevo"
    channel: ClassVar[Channel] = Channel.email
    settings_model: ClassVar[type[BaseModel]] = BrevoSettings
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.webhooks})
    max_batch: ClassVar[int | None] = 100  # one request per touch: a call ends well inside a lease
    # For the contract table (tests/connectors/test_contract.py): it starts a local Brevo
    # (tests/connectors/brevo_server.py) on a free port, puts it in base_url, and sets both variables.
    example_settings: ClassVar[dict[str, Any]] = {
        "base_url": "http://127.0.0.1/v3",
        "api_key_env": "RELANCE_TEST_BREVO_API_KEY",
        "webhook_secret_env": "RELANCE_TEST_BREVO_WEBHOOK_TOKEN",
        "timeout_seconds": 5.0,
    }
    settings: BrevoSettings

    def __init__(self, settings: BaseModel | Mapping[str, Any] | None = None, *, workspace: Any = None,
                 transport: httpx.BaseTransport | None = None):
        if not isinstance(settings, BrevoSettings):
            data = settings.model_dump() if isinstance(settings, BaseModel) else dict(settings or {})
            settings = BrevoSettings.model_validate(data)
        super().__init__(settings, workspace=workspace)
        self._transport = transport  # httpx's seam for unit tests
        self._client: httpx.Client | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------- client
    def _http(self) -> httpx.Client:
        """Created on first send (and again after a fork): connections are reused batch to batch."""
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = httpx.Client(
                    base_url=self.settings.base_url,
                    timeout=httpx.Timeout(self.settings.timeout_seconds),
                    headers={"accept": "application/json", "content-type": "application/json"},
                    transport=self._transport,
                )
                self._pid = os.getpid()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None

    # --------------------------------------------------------------------- send
    def send_batch(self, touches: Sequence[OutboundTouch], now: datetime) -> list[SendResult]:
        api_key = os.environ.get(self.settings.api_key_env)
        if not api_key:
            error = TerminalError(f"brevo: environment variable {self.settings.api_key_env} (the API key) is not set")
            return [SendResult(t.touch_id, error=error) for t in touches]
        results: list[SendResult] = []
        stop: RelanceError | None = None  # once Brevo says stop (429, bad key, unreachable), the rest waits
        for touch in touches:
            if stop is not None:
                results.append(SendResult(touch.touch_id, error=stop))
                continue
            try:
                payload = self.payload(touch, now)
            except TerminalError as exc:  # a bad address fails alone, before any request
                results.append(SendResult(touch.touch_id, error=exc))
                continue
            result, stop = self._send_one(touch, payload, api_key)
            results.append(result)
        return results

    def payload(self, touch: OutboundTouch, now: datetime) -> dict[str, Any]:
        """The JSON body for one touch; raises TerminalError for one no provider would take."""
        if touch.channel != Channel.email:
            raise TerminalError(f"brevo: email connector got a {touch.channel.value} touch")
        if not touch.idempotency_key:
            raise TerminalError("brevo: touch has no idempotency key")
        msg = build_email(touch, date=now)  # the same validation and hygiene as SMTP and the sandbox
        headers: dict[str, str] = {"idempotencyKey": brevo_idempotency_key(touch)}
        threading = ("Message-ID", "In-Reply-To", "References")
        for name, brevo_name in (
            ("Message-ID", "Message-Id"),  # Brevo writes header names This-Case
            ("In-Reply-To", "In-Reply-To"),
            ("References", "References"),
            ("List-Unsubscribe", "List-Unsubscribe"),
            ("List-Unsubscribe-Post", "List-Unsubscribe-Post"),
            ("X-Relance-Touch", "X-Relance-Touch"),
        ):
            if name in threading and not self.settings.threading_headers:
                continue
            if msg[name] is not None:
                headers[brevo_name] = one_line(str(msg[name]))
        # Echoed back in every webhook of this message: the surest way home.
        headers["X-Mailin-custom"] = json.dumps({"relance_key": touch.idempotency_key}, separators=(",", ":"))
        sender: dict[str, str] = {"email": msg["From"].addresses[0].addr_spec}
        if name := _display_name(touch.sender.name):
            sender["name"] = name
        to: dict[str, str] = {"email": msg["To"].addresses[0].addr_spec}
        if name := _display_name(touch.recipient_name):
            to["name"] = name
        body: dict[str, Any] = {
            "sender": sender,
            "to": [to],
            "subject": one_line(touch.subject) if touch.subject else "",
            "textContent": msg.get_body(("plain",)).get_content(),
            "headers": headers,
        }
        if not body["subject"]:
            raise TerminalError("brevo: an email needs a subject")
        html = touch.metadata.get("html") if touch.metadata else None
        if isinstance(html, str) and html.strip():
            body["htmlContent"] = html
        tags = list(self.settings.tags)
        meta = touch.metadata or {}
        for key in ("sequence", "step_id", "variant"):
            if meta.get(key):
                tags.append(f"{key.removesuffix('_id')}:{one_line(meta[key])}"[:100])
        if tags:
            body["tags"] = tags
        return body

    def _send_one(self, touch: OutboundTouch, payload: dict[str, Any], api_key: str) -> tuple[SendResult, RelanceError | None]:
        """One POST; returns the result and, when the whole batch should stop, why."""
        to = payload["to"][0]["email"]
        try:
            response = self._http().post("/smtp/email", json=payload, headers={"api-key": api_key})
        except httpx.TimeoutException as exc:
            # Brevo may have accepted it: the retry carries the same idempotencyKey.
            error = TransientError(f"brevo: timed out sending to {to} ({type(exc).__name__})")
            return SendResult(touch.touch_id, error=error), (error if isinstance(exc, httpx.ConnectTimeout) else None)
        except httpx.TransportError as exc:
            error = TransientError(f"brevo: cannot reach {self.settings.base_url} ({type(exc).__name__}: {exc})")
            return SendResult(touch.touch_id, error=error), (error if isinstance(exc, httpx.ConnectError) else None)
        status = response.status_code
        if 200 <= status < 300:
            try:
                data = response.json()
            except (ValueError, UnicodeDecodeError):
                data = None
            message_id = data.get("messageId") if isinstance(data, dict) else None
            # Accepted all the same: webhooks still match through our Message-ID and X-Mailin-custom.
            return SendResult(touch.touch_id, provider_message_id=message_id if isinstance(message_id, str) and message_id else None), None
        reason = _error_reason(response)
        if status == 429:
            wait = parse_retry_after(response.headers)
            error = TransientError(f"brevo: 429 rate limited ({reason})", retry_after=wait)
            return SendResult(touch.touch_id, error=error), error
        if status == 408 or status >= 500:
            error = TransientError(f"brevo: {status} ({reason})", retry_after=parse_retry_after(response.headers))
            return SendResult(touch.touch_id, error=error), None
        terminal = TerminalError(f"brevo: {status} {reason} (to {to})")
        if status in (401, 402):  # the key or the account: every other touch would fail the same way
            return SendResult(touch.touch_id, error=terminal), TerminalError(f"brevo: {status} {reason}")
        return SendResult(touch.touch_id, error=terminal), None

    # ------------------------------------------------------------------ webhook
    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> list[InboundEvent]:
        """Authenticate, then normalise one event or a batched array. Anything forged or
        malformed is a TerminalError (the web app answers 4xx); nothing else escapes."""
        self._authenticate(headers)
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TerminalError("brevo webhook: body must be bytes")
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise TerminalError(f"brevo webhook: body is not JSON ({type(exc).__name__})") from None
        if isinstance(data, dict):
            if "items" in data:
                raise TerminalError("brevo webhook: this is an inbound-parse payload; point Brevo's *transactional* webhook here")
            items = [data]
        elif isinstance(data, list) and data:
            items = data
        else:
            raise TerminalError("brevo webhook: expected an event object or a non-empty array of them")
        events = []
        for index, item in enumerate(items):
            event = self._event(item, f"brevo webhook: event[{index}]" if isinstance(data, list) else "brevo webhook")
            if event is not None:
                events.append(event)
        return events

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        try:
            supplied = next((str(v) for k, v in headers.items() if str(k).lower() == "authorization"), "")
        except (AttributeError, TypeError):
            raise TerminalError("brevo webhook: headers are not a mapping") from None
        secret = os.environ.get(self.settings.webhook_secret_env, "")
        if not secret:
            raise Unauthenticated(f"brevo webhook: refused, {self.settings.webhook_secret_env} is not set (webhooks must be authenticated)")
        scheme, _, credentials = supplied.strip().partition(" ")
        expected_scheme = self.settings.webhook_auth
        if scheme.lower() != expected_scheme:
            raise Unauthenticated(f"brevo webhook: missing {expected_scheme.capitalize()} Authorization header")
        given = credentials.strip().encode("utf-8", "replace")
        if expected_scheme == "basic":
            try:
                given = base64.b64decode(given, validate=True)
            except (binascii.Error, ValueError):
                raise Unauthenticated("brevo webhook: Authorization Basic is not base64") from None
        if not hmac.compare_digest(given, secret.encode("utf-8")):
            raise Unauthenticated("brevo webhook: credentials do not match (forged, or another webhook secret)")

    def _event(self, item: Any, where: str) -> InboundEvent | None:
        if not isinstance(item, dict):
            raise TerminalError(f"{where} is not an object")
        name = item.get("event")
        if not isinstance(name, str) or not name:
            raise TerminalError(f"{where} has no event name")
        text = {}
        for field in ("email", "message-id", "reason", "link", "tag", "X-Mailin-custom", "subject"):
            value = item.get(field)
            if value is not None and not isinstance(value, str):
                if field == "tag" and isinstance(value, list):  # seen live as a list too
                    continue
                raise TerminalError(f"{where}: {field} must be a string")
            text[field] = value
        tags = item.get("tags")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise TerminalError(f"{where}: tags must be a list of strings")
        recipient = (text["email"] or "").strip() or None
        raw_id = (text["message-id"] or "").strip() or None
        if recipient is None and raw_id is None:
            raise TerminalError(f"{where} names neither a recipient (email) nor a message-id")
        occurred_at = self._occurred_at(item, where)
        if name not in EVENTS:
            if name in IGNORED_EVENTS or name.isidentifier():
                return None  # an event we do not track; Brevo must not retry it forever
            raise TerminalError(f"{where} has an unreadable event name {name[:40]!r}")
        kind, detail = EVENTS[name]
        key = _relance_key(text["X-Mailin-custom"])
        stamp = item.get("ts_epoch", item.get("ts_event", item.get("ts", item.get("date"))))
        digest = hashlib.sha256(
            json.dumps([name, raw_id, recipient and recipient.lower(), stamp, text["link"]], default=str).encode()
        ).hexdigest()[:40]
        payload: dict[str, Any] = {"provider": "brevo", "event": name}
        for field in ("reason", "link"):
            if text[field]:
                payload[field] = text[field].strip()
        if tags:
            payload["tags"] = tags
        return InboundEvent(
            kind=kind,
            channel=Channel.email,
            occurred_at=occurred_at,
            dedupe_key=f"brevo:{name}:{digest}",
            idempotency_key=key,
            provider_message_id=raw_id,
            message_id=f"<{raw_id.strip('<>')}>" if raw_id and raw_id.strip("<>") else None,
            recipient=recipient,
            detail=detail if kind == EventKind.bounced else (payload.get("reason") or detail),
            payload=payload,
        )

    @staticmethod
    def _occurred_at(item: Mapping[str, Any], where: str) -> datetime:
        """ts_epoch (UTC ms) first: Brevo's other stamps follow the account's time zone."""
        for field, scale in (("ts_epoch", 1000.0), ("ts_event", 1.0), ("ts", 1.0)):
            value = item.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TerminalError(f"{where}: {field} must be a number")
            seconds = value / scale
            if not _MIN_EPOCH <= seconds <= _MAX_EPOCH:
                raise TerminalError(f"{where}: {field} {value!r} is not a plausible timestamp")
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        raw = item.get("date")
        if isinstance(raw, str):
            try:
                local = datetime.fromisoformat(raw.strip().replace(", ", " ").replace(" ", "T", 1))
            except ValueError:
                raise TerminalError(f"{where}: date {raw[:40]!r} is not YYYY-MM-DD HH:MM:SS") from None
            aware = local if local.tzinfo else local.replace(tzinfo=_PARIS)
            return aware.astimezone(timezone.utc)
        raise TerminalError(f"{where} has no timestamp (ts_epoch, ts_event, ts or date)")


def _relance_key(custom: str | None) -> str | None:
    """Our idempotency key from the X-Mailin-custom header we set; anything else is ignored,
    since another tool on the same Brevo account may use that header its own way."""
    if not custom:
        return None
    try:
        data = json.loads(custom)
    except (ValueError, RecursionError):
        return None
    key = data.get("relance_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None

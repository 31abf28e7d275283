"""The sandbox: a local provider for every channel, the embedded default and the load generator.

It records what would be sent (a real .eml file per email, a JSON line per LinkedIn or call
touch) under an outbox directory, and simulates the responses a B2B campaign gets at
configurable rates and delays. Every decision is derived from the seed and the touch's
idempotency key, never from a global random state, so a run replays identically and a
retried touch meets the same fate. As at a real provider, a send only records the message:
its responses are drawn when they are first polled for, not while the sender waits. What the
sandbox remembers (accepted messages, drawn responses) lives in `<outbox>/sandbox.db`, so
several processes can share one outbox.

Rates and delays are keyed "<channel>.<what>". A rate is the share of touches that get the
event (opened 0.45 means 45 % of sent emails are opened), except the ones named "..._after_x",
which are shares of x; call outcome rates are normalised to sum to 1.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
import hmac
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from relance.channels import BaseConnector, Capability, InboundEvent, OutboundTouch, SendResult, register
from relance.email_message import build_email, make_message_id
from relance.errors import RelanceError, TerminalError, TransientError, Unauthenticated
from relance.events import Channel, EventKind
from relance.store import use_wal

__all__ = ["SandboxCall", "SandboxEmail", "SandboxLinkedIn", "SandboxSettings", "sign_webhook"]

DEFAULT_RATES: dict[str, float] = {
    "email.delivered": 0.97,
    "email.bounced_hard": 0.02,
    "email.bounced_soft": 0.01,
    "email.opened": 0.45,
    "email.clicked": 0.08,
    "email.replied": 0.07,
    "email.auto_replied": 0.03,
    "email.unsubscribed": 0.01,
    "email.complained": 0.001,
    "email.meeting_booked_after_reply": 0.3,
    "linkedin.accepted": 0.35,  # of invitations
    "linkedin.replied": 0.10,  # of messages
    "call.connected": 0.25,
    "call.voicemail": 0.40,
    "call.no_answer": 0.30,
    "call.wrong_number": 0.05,
    "call.meeting_booked_after_connected": 0.25,
    "call.disqualified_after_connected": 0.20,  # BANT says not now: on_exit hands them to nurture
}

# Hours after the send (meeting_booked: after the reply or the connected call).
DEFAULT_DELAYS_HOURS: dict[str, float] = {
    "email.delivered": 0.01,
    "email.bounced": 0.05,
    "email.auto_replied": 0.1,
    "email.opened": 3.0,
    "email.clicked": 4.0,
    "email.replied": 20.0,
    "email.unsubscribed": 6.0,
    "email.complained": 24.0,
    "email.meeting_booked": 4.0,
    "linkedin.accepted": 30.0,
    "linkedin.replied": 24.0,
    "call.outcome": 0.0,
    "call.meeting_booked": 0.0,
}

CALL_OUTCOMES: dict[str, EventKind] = {
    "connected": EventKind.call_connected,
    "voicemail": EventKind.call_voicemail,
    "no_answer": EventKind.call_no_answer,
    "wrong_number": EventKind.call_wrong_number,
}

_BOUNCE_REASONS = {
    "hard": "550 5.1.1 The email account that you tried to reach does not exist",
    "soft": "452 4.2.2 The recipient's mailbox is full; try again later",
}
_IN_CHUNK = 500  # keys per IN (...) query, well under SQLite's variable limit
_DRAW_CHUNK = 5_000  # accepted messages whose responses are drawn per transaction


def _merge_known(value: Mapping[str, float], defaults: Mapping[str, float], what: str) -> dict[str, float]:
    """Overrides merge into the defaults, so a config names only what it changes."""
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))} (known: {', '.join(sorted(defaults))})")
    return {**defaults, **value}


class SandboxSettings(BaseModel):
    """One model for the three channels; each `connectors.<channel>.settings` fills its own."""

    model_config = ConfigDict(extra="forbid")

    outbox: str = "outbox"  # relative to the workspace root, else the working directory
    seed: int = 7
    rates: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_RATES), validate_default=True)
    delays_hours: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_DELAYS_HOURS), validate_default=True)
    jitter: float = Field(default=0.5, ge=0, lt=1)  # each delay varies by up to ±jitter of itself
    fail_rate: float = Field(default=0.0, ge=0, le=1)  # fault injection: share of send attempts that fail
    fail_kind: Literal["transient", "terminal"] = "transient"
    retry_after_seconds: float | None = Field(default=None, ge=0)
    webhook_secret: str = "sandbox-secret"
    poll_limit: int = Field(default=10_000, ge=1, le=1_000_000)  # events per poll call
    email_record: Literal["eml", "jsonl"] = "eml"  # jsonl skips MIME building for load runs

    @field_validator("rates")
    @classmethod
    def _rates(cls, value: dict[str, float]) -> dict[str, float]:
        rates = _merge_known(value, DEFAULT_RATES, "rate")
        for key, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rate {key!r} must be between 0 and 1, got {rate}")
        eps = 1e-9
        bounced = rates["email.bounced_hard"] + rates["email.bounced_soft"]
        if bounced > 1 + eps:
            raise ValueError("email.bounced_hard + email.bounced_soft cannot exceed 1")
        if rates["email.delivered"] > 1 - bounced + eps:
            raise ValueError(f"email.delivered ({rates['email.delivered']}) cannot exceed 1 - bounces ({1 - bounced:.4g})")
        for child, parent in (
            ("opened", "delivered"), ("auto_replied", "delivered"), ("unsubscribed", "delivered"),
            ("complained", "delivered"), ("clicked", "opened"), ("replied", "opened"),
        ):
            if rates[f"email.{child}"] > rates[f"email.{parent}"] + eps:
                raise ValueError(
                    f"email.{child} ({rates[f'email.{child}']}) cannot exceed email.{parent} "
                    f"({rates[f'email.{parent}']}): every {child} email was {parent} first"
                )
        if rates["call.meeting_booked_after_connected"] + rates["call.disqualified_after_connected"] > 1 + eps:
            raise ValueError("call.meeting_booked_after_connected + call.disqualified_after_connected cannot exceed 1")
        if sum(rates[f"call.{o}"] for o in CALL_OUTCOMES) <= 0:
            raise ValueError("at least one call outcome rate must be above 0")
        return rates

    @field_validator("delays_hours")
    @classmethod
    def _delays(cls, value: dict[str, float]) -> dict[str, float]:
        delays = _merge_known(value, DEFAULT_DELAYS_HOURS, "delay")
        negative = sorted(k for k, v in delays.items() if v < 0)
        if negative:
            raise ValueError(f"delays cannot be negative: {', '.join(negative)}")
        return delays

    @model_validator(mode="after")
    def _retry_after_needs_transient(self) -> "SandboxSettings":
        if self.retry_after_seconds is not None and self.fail_kind != "transient":
            raise ValueError("retry_after_seconds applies to fail_kind: transient only")
        return self


def sign_webhook(body: bytes, secret: str = "sandbox-secret") -> str:
    """The X-Sandbox-Signature value for a body: hex HMAC-SHA256, as real providers sign."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def _draw(seed: int, key: str, name: str) -> float:
    """A uniform in [0, 1) fixed by (seed, key, name): one named draw per decision, so changing
    one rate never reshuffles the others."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 18446744073709551616.0


def _share(part: float, whole: float) -> float:
    return min(1.0, part / whole) if whole > 0 else 0.0


def _utc(when: datetime) -> datetime:
    if when.tzinfo is timezone.utc:  # the common case, on every line and simulated event
        return when
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


@lru_cache(maxsize=256)  # a batch stamps thousands of lines with the same `now`
def _iso(when: datetime) -> str:
    """Fixed width, so text order is time order in SQLite."""
    return _utc(when).isoformat(timespec="microseconds")


def provider_message_id(key: str) -> str:
    return "sandbox-" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _file_name(key: str) -> str:
    """A key as a file name: readable when it is safe, with a hash when it had to change."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in key)[:120]
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != key:
        safe = f"{safe}-{hashlib.blake2b(key.encode(), digest_size=5).hexdigest()}"
    return safe


def _resolve_outbox(outbox: str, workspace: Any) -> Path:
    path = Path(outbox).expanduser()
    if path.is_absolute():
        return path
    root = getattr(workspace, "root", None)
    return (Path(root) if root is not None else Path.cwd()) / path


# One encoder for every line: json.dumps builds a new one per call when given options.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _event_json(event: dict[str, Any]) -> str:
    return _encode(event)


def _inbound(data: Mapping[str, Any]) -> InboundEvent:
    return InboundEvent(
        kind=EventKind(data["kind"]),
        channel=Channel(data["channel"]),
        occurred_at=datetime.fromisoformat(data["occurred_at"]),
        dedupe_key=data["dedupe_key"],
        touch_id=data.get("touch_id"),
        idempotency_key=data.get("idempotency_key"),
        provider_message_id=data.get("provider_message_id"),
        message_id=data.get("message_id"),
        recipient=data.get("recipient"),
        detail=data.get("detail"),
        payload=data.get("payload") or {},
    )


_OUTBOX_LOCKS: dict[str, threading.RLock] = {}
_OUTBOX_LOCKS_GUARD = threading.Lock()


def _outbox_lock(db_path: Path) -> threading.RLock:
    """One lock per outbox database in this process, shared by its three channel connectors:
    their sends run side by side on PostgreSQL, and waiting on a Python lock hands over at
    once, where SQLite's busy handler sleeps in steps of up to 100 ms."""
    with _OUTBOX_LOCKS_GUARD:
        return _OUTBOX_LOCKS.setdefault(str(db_path.resolve()), threading.RLock())


# An accepted message keeps what its simulated responses need; `drawn` says whether they are
# in `responses` yet (outboxes from before lazy drawing get the columns, their rows drawn = 1).
_ACCEPTED_COLUMNS = (
    ("channel", "TEXT"), ("action", "TEXT"), ("touch_id", "INTEGER"), ("recipient", "TEXT"), ("message_id", "TEXT"),
    ("sent_at", "TEXT"), ("drawn", "INTEGER NOT NULL DEFAULT 1"),
)  # fmt: skip
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS accepted (key TEXT PRIMARY KEY, provider_message_id TEXT NOT NULL,"
    + ",".join(f" {name} {kind}" for name, kind in _ACCEPTED_COLUMNS) + ")",
    "CREATE TABLE IF NOT EXISTS responses (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, due_at TEXT NOT NULL,"
    " event TEXT NOT NULL, delivered INTEGER NOT NULL DEFAULT 0)",
    # Only what is still to deliver is indexed, so a poll costs O(due), whatever was delivered before.
    "CREATE INDEX IF NOT EXISTS responses_pending ON responses (channel, due_at, id) WHERE delivered = 0",
    "CREATE TABLE IF NOT EXISTS attempts (key TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    # How far each outbox .jsonl is covered by committed acceptances (see _Sandbox._recover).
    "CREATE TABLE IF NOT EXISTS outbox_files (name TEXT PRIMARY KEY, size INTEGER NOT NULL)",
)
_UNDRAWN_INDEX = "CREATE INDEX IF NOT EXISTS accepted_undrawn ON accepted (channel) WHERE drawn = 0"
_ACCEPT = (
    "INSERT INTO accepted (key, provider_message_id, channel, action, touch_id, recipient, message_id, sent_at, drawn)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)"
)
_RECOVER = _ACCEPT.replace("INSERT INTO", "INSERT OR IGNORE INTO")


class _Sent(NamedTuple):
    """An accepted message, as its responses are drawn from it (a row of `accepted`)."""

    key: str
    provider_message_id: str
    channel: str
    action: str
    touch_id: int | None
    recipient: str | None
    message_id: str | None
    sent_at: str


class _Simulation:
    """Collects the responses one accepted message will get, as (channel, due_at, event json) rows."""

    __slots__ = ("settings", "sent", "now", "rows")

    def __init__(self, settings: SandboxSettings, sent: _Sent):
        self.settings, self.sent = settings, sent
        self.now = datetime.fromisoformat(sent.sent_at)
        self.rows: list[tuple[str, str, str]] = []

    def draw(self, name: str) -> float:
        return _draw(self.settings.seed, self.sent.key, name)

    def at(self, delay: str, *, base: datetime | None = None, after: datetime | None = None) -> datetime:
        hours = self.settings.delays_hours[delay]
        if hours and self.settings.jitter:
            hours *= 1 + self.settings.jitter * (2 * self.draw(f"delay:{delay}") - 1)
        when = (base or self.now) + timedelta(hours=hours)
        if after is not None and when <= after:  # a click never precedes its open
            when = after + timedelta(minutes=1)
        return when

    def emit(self, kind: EventKind, when: datetime, detail: str | None = None, payload: dict[str, Any] | None = None) -> None:
        s = self.sent
        event = {
            "kind": kind.value,
            "channel": s.channel,
            "occurred_at": _iso(when),
            "dedupe_key": f"sandbox:{s.key}:{kind.value}",
            "touch_id": s.touch_id,
            "idempotency_key": s.key,
            "provider_message_id": s.provider_message_id,
            "message_id": s.message_id,
            "recipient": s.recipient,
            "detail": detail,
            "payload": payload or {},
        }
        self.rows.append((s.channel, event["occurred_at"], _event_json(event)))


class _Sandbox(BaseConnector, ABC):
    """Shared by the three channels: they differ in what they record and what they simulate."""

    name: ClassVar[str] = "sandbox"
    settings_model: ClassVar[type[BaseModel]] = SandboxSettings
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.idempotent_send, Capability.polling})
    settings: SandboxSettings

    def __init__(self, settings: BaseModel | Mapping[str, Any] | None = None, *, workspace: Any = None):
        if not isinstance(settings, SandboxSettings):
            data = settings.model_dump() if isinstance(settings, BaseModel) else dict(settings or {})
            settings = SandboxSettings.model_validate(data)
        super().__init__(settings, workspace=workspace)
        self.outbox = _resolve_outbox(settings.outbox, workspace)
        self.db_path = self.outbox / "sandbox.db"
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._lock = _outbox_lock(self.db_path)

    # ------------------------------------------------------------------ storage
    def _db(self) -> sqlite3.Connection:
        """Opened on first use (loading a workspace must not create files) and again after a fork."""
        if self._conn is None or self._pid != os.getpid():
            self.outbox.mkdir(parents=True, exist_ok=True)
            self._prepare_outbox()
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            use_wal(conn)
            conn.execute("PRAGMA synchronous = OFF")  # a sandbox: speed over surviving a power cut
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                have = {row[1] for row in conn.execute("PRAGMA table_info(accepted)")}
                for name, kind in _ACCEPTED_COLUMNS:
                    if name not in have:
                        conn.execute(f"ALTER TABLE accepted ADD COLUMN {name} {kind}")
                conn.execute(_UNDRAWN_INDEX)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _prepare_outbox(self) -> None:
        return None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the lock up front, so two processes
        queue on the busy timeout instead of deadlocking on a read-to-write upgrade."""
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _accepted(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for i in range(0, len(keys), _IN_CHUNK):
            chunk = keys[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(conn.execute(f"SELECT key, provider_message_id FROM accepted WHERE key IN ({marks})", chunk))
        return found

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # --------------------------------------------------------------------- send
    def send_batch(self, touches: Sequence[OutboundTouch], now: datetime) -> list[SendResult]:
        """One SQLite transaction per batch; a key already accepted is answered, not re-sent."""
        now = _utc(now)
        try:
            return self._send(touches, now)
        except sqlite3.Error as exc:
            raise TransientError(f"sandbox database {self.db_path}: {exc}", retry_after=5.0) from None
        except OSError as exc:
            raise TransientError(f"sandbox outbox {self.outbox}: {exc}", retry_after=5.0) from None

    def _send(self, touches: Sequence[OutboundTouch], now: datetime) -> list[SendResult]:
        errors: dict[str, RelanceError] = {}
        first: dict[str, OutboundTouch] = {}  # a key twice in one batch is sent once
        for t in touches:
            if t.idempotency_key and t.channel == self.channel:
                first.setdefault(t.idempotency_key, t)
        with self._lock:
            known = self._accepted(self._db(), list(first))
        # The costly part (building MIME messages) runs before taking the database lock.
        prepared: dict[str, Any] = {}
        for key, t in first.items():
            if key not in known:
                try:
                    prepared[key] = self._prepare(t, now)
                except TerminalError as exc:
                    errors[key] = exc
        pmids = {k: provider_message_id(k) for k in prepared}
        sent_at = _iso(now)
        if prepared:
            with self._transaction() as conn:
                self._recover(conn)
                raced = self._accepted(conn, list(prepared))  # another process may have sent them meanwhile
                known.update(raced)
                fresh = [k for k in prepared if k not in raced]
                if self.settings.fail_rate > 0:
                    errors.update(self._inject_faults(conn, fresh))
                todo = [k for k in fresh if k not in errors]
                accepted = {k: pmids[k] for k in todo}
                self._record([(first[k], accepted[k], prepared[k]) for k in todo], now)
                conn.executemany(_ACCEPT, [self._accepted_row(first[k], pmid, sent_at) for k, pmid in accepted.items()])
                self._covered(conn)
                known.update(accepted)
        return [self._result(t, known, errors) for t in touches]

    def _jsonl(self) -> Path | None:
        """The outbox file this channel appends a line per message to (None: a file each)."""
        return self.outbox / f"{self.channel.value}.jsonl"

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Lines of a send that died between writing the outbox and committing its acceptance
        (killed, or its transaction failed): those messages went out, so they are accepted now
        from their lines, and a resend of their keys is answered instead of written again.
        They are whatever the file holds past the size the last committed send left."""
        path = self._jsonl()
        if path is None or not path.exists():
            return
        size = path.stat().st_size
        covered = conn.execute("SELECT size FROM outbox_files WHERE name = ?", (path.name,)).fetchone()
        start = covered[0] if covered else 0
        if size > start:
            with path.open("rb") as fh:
                fh.seek(start)
                tail = fh.read(size - start)
            rows = []
            for raw in tail.splitlines():
                try:
                    line = json.loads(raw)
                    key = line["idempotency_key"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by the crash: that message never fully went out
                rows.append((key, provider_message_id(key), self.channel.value, line.get("action"), line.get("touch_id"),
                             line.get("recipient"), line.get("message_id"), line.get("at")))  # fmt: skip
            conn.executemany(_RECOVER, rows)
        if size != start:
            self._covered(conn)

    def _covered(self, conn: sqlite3.Connection) -> None:
        if (path := self._jsonl()) is not None:
            size = path.stat().st_size if path.exists() else 0
            conn.execute("INSERT INTO outbox_files (name, size) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET size = excluded.size", (path.name, size))

    @staticmethod
    def _accepted_row(t: OutboundTouch, pmid: str, sent_at: str) -> tuple[Any, ...]:
        message_id = t.message_id
        if message_id is None and t.channel == Channel.email:  # what build_email wrote instead
            message_id = make_message_id(t.sender.address, t.idempotency_key)
        return (t.idempotency_key, pmid, t.channel.value, t.action, t.touch_id, t.recipient, message_id, sent_at)

    def _result(self, t: OutboundTouch, known: Mapping[str, str], errors: Mapping[str, RelanceError]) -> SendResult:
        if t.channel != self.channel:
            return SendResult(t.touch_id, error=TerminalError(f"sandbox {self.channel.value} connector got a {t.channel!s} touch"))
        if not t.idempotency_key:
            return SendResult(t.touch_id, error=TerminalError("touch has no idempotency key"))
        if t.idempotency_key in errors:
            return SendResult(t.touch_id, error=errors[t.idempotency_key])
        return SendResult(t.touch_id, provider_message_id=known[t.idempotency_key])

    def _inject_faults(self, conn: sqlite3.Connection, keys: list[str]) -> dict[str, RelanceError]:
        """Each attempt at a key draws again, so a transient fault clears on a later retry, as outages do."""
        counts: dict[str, int] = {}
        for i in range(0, len(keys), _IN_CHUNK):
            chunk = keys[i : i + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            counts.update(conn.execute(f"SELECT key, n FROM attempts WHERE key IN ({marks})", chunk))
        conn.executemany(
            "INSERT INTO attempts (key, n) VALUES (?, 1) ON CONFLICT (key) DO UPDATE SET n = n + 1", [(k,) for k in keys]
        )
        s = self.settings
        faults: dict[str, RelanceError] = {}
        for key in keys:
            attempt = counts.get(key, 0) + 1
            # A permanent rejection stays one: only transient faults draw again per attempt.
            name = f"fault:{attempt}" if s.fail_kind == "transient" else "fault"
            if _draw(s.seed, key, name) < s.fail_rate:
                if s.fail_kind == "terminal":
                    faults[key] = TerminalError(f"sandbox: simulated permanent rejection of {key}")
                else:
                    faults[key] = TransientError(
                        f"sandbox: simulated provider outage for {key} (attempt {attempt})", retry_after=s.retry_after_seconds
                    )
        return faults

    def _line(self, t: OutboundTouch, now: datetime, **extra: Any) -> str:
        return _event_json({
            "at": _iso(now),
            "touch_id": t.touch_id,
            "idempotency_key": t.idempotency_key,
            "action": t.action,
            "recipient": t.recipient,
            "recipient_name": t.recipient_name,
            "sender": t.sender.address,
            "sender_name": t.sender.name,
            **extra,
            "body": t.body,
        }) + "\n"

    def _append(self, path: Path, lines: Iterable[str]) -> None:
        """One write(2) in append mode, under the database lock: a worker killed with -9 leaves
        a batch's lines whole or absent, never a torn line that the next batch would continue
        (a buffered file object may split a large write in several). Should a file end mid-line
        all the same (a full disk), the next batch starts on a line of its own."""
        data = "".join(lines).encode("utf-8")
        if not data:
            return
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    # Channel specifics.
    def _prepare(self, t: OutboundTouch, now: datetime) -> Any:
        """What will be recorded; raise TerminalError for a touch no provider would take."""
        return self._line(t, now)

    def _record(self, items: list[tuple[OutboundTouch, str, Any]], now: datetime) -> None:
        self._append(self.outbox / f"{self.channel.value}.jsonl", (line for _, _, line in items))

    @abstractmethod
    def _simulate(self, sim: _Simulation) -> None:
        """Schedule the simulated responses to one accepted touch (each channel its own)."""

    # --------------------------------------------------------------------- poll
    def poll(self, now: datetime) -> list[InboundEvent]:
        """The next chunk of due responses, oldest first, each handed over exactly once."""
        try:
            while self._draw_responses() == _DRAW_CHUNK:
                pass
            with self._transaction() as conn:
                rows = conn.execute(
                    "SELECT id, event FROM responses WHERE channel = ? AND delivered = 0 AND due_at <= ?"
                    " ORDER BY due_at, id LIMIT ?",
                    (self.channel.value, _iso(now), self.settings.poll_limit),
                ).fetchall()
                conn.executemany("UPDATE responses SET delivered = 1 WHERE id = ?", [(r[0],) for r in rows])
        except sqlite3.Error as exc:
            raise TransientError(f"sandbox database {self.db_path}: {exc}", retry_after=5.0) from None
        return [_inbound(json.loads(event)) for _, event in rows]

    def _draw_responses(self) -> int:
        """Schedule the responses of up to _DRAW_CHUNK accepted messages not drawn yet; each
        message is drawn once, whichever process polls first."""
        with self._transaction() as conn:
            pending = [
                _Sent(*row)
                for row in conn.execute(
                    "SELECT key, provider_message_id, channel, action, touch_id, recipient, message_id, sent_at"
                    " FROM accepted WHERE channel = ? AND drawn = 0 LIMIT ?",
                    (self.channel.value, _DRAW_CHUNK),
                )
            ]
            rows = []
            for sent in pending:
                sim = _Simulation(self.settings, sent)
                self._simulate(sim)
                rows.extend(sim.rows)
            conn.executemany("INSERT INTO responses (channel, due_at, event) VALUES (?, ?, ?)", rows)
            conn.executemany("UPDATE accepted SET drawn = 1 WHERE key = ?", [(sent.key,) for sent in pending])
        return len(pending)

    # ------------------------------------------------------------------ webhook
    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> list[InboundEvent]:
        """Simulated provider callbacks, signed like real ones: a forgery never becomes an event."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise TerminalError("sandbox webhook: body must be bytes")
        body = bytes(body)
        try:
            signature = next((str(v) for k, v in headers.items() if str(k).lower() == "x-sandbox-signature"), None)
        except (AttributeError, TypeError):
            raise TerminalError("sandbox webhook: headers are not a mapping") from None
        if not signature:
            raise Unauthenticated("sandbox webhook: missing X-Sandbox-Signature header")
        expected = sign_webhook(body, self.settings.webhook_secret)
        if not hmac.compare_digest(signature.strip().lower().encode("utf-8", "replace"), expected.encode()):
            raise Unauthenticated("sandbox webhook: X-Sandbox-Signature does not match the body (forged, or another webhook_secret)")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TerminalError(f"sandbox webhook: body is not JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise TerminalError('sandbox webhook: expected a JSON object {"events": [...]}')
        return [self._webhook_event(i, item) for i, item in enumerate(data["events"])]

    def _webhook_event(self, index: int, item: Any) -> InboundEvent:
        where = f"sandbox webhook: events[{index}]"
        if not isinstance(item, dict):
            raise TerminalError(f"{where} is not an object")
        try:
            kind = EventKind(item.get("kind"))
        except (ValueError, TypeError):
            known = ", ".join(k.value for k in EventKind)
            raise TerminalError(f"{where} has unknown kind {item.get('kind')!r} (known: {known})") from None
        event_id = item.get("id")
        if isinstance(event_id, bool) or not isinstance(event_id, (str, int)) or str(event_id) == "":
            raise TerminalError(f"{where} has no id")
        raw_when = item.get("occurred_at")
        try:
            occurred_at = _utc(datetime.fromisoformat(raw_when))
        except (TypeError, ValueError):
            raise TerminalError(f"{where} has no ISO 8601 occurred_at (got {raw_when!r})") from None
        touch_id = item.get("touch_id")
        if touch_id is not None and (isinstance(touch_id, bool) or not isinstance(touch_id, int)):
            raise TerminalError(f"{where}: touch_id must be an integer")
        text = {}
        for field in ("idempotency_key", "recipient", "detail", "message_id", "provider_message_id"):
            value = item.get(field)
            if value is not None and not isinstance(value, str):
                raise TerminalError(f"{where}: {field} must be a string")
            text[field] = value
        payload = item.get("payload") or {}
        if not isinstance(payload, dict):
            raise TerminalError(f"{where}: payload must be an object")
        return InboundEvent(
            kind=kind,
            channel=self.channel,
            occurred_at=occurred_at,
            dedupe_key=f"sandbox:webhook:{event_id}",
            touch_id=touch_id,
            payload=payload,
            **text,
        )


@register
class SandboxEmail(_Sandbox):
    """Writes each email as the .eml a mail server would receive."""

    channel: ClassVar[Channel] = Channel.email

    def _prepare_outbox(self) -> None:
        if self.settings.email_record == "eml":
            (self.outbox / "email").mkdir(exist_ok=True)

    def _jsonl(self) -> Path | None:
        return super()._jsonl() if self.settings.email_record == "jsonl" else None  # eml: a file per key, rewritten on a resend

    def _prepare(self, t: OutboundTouch, now: datetime) -> Any:
        if self.settings.email_record == "jsonl":
            if "@" not in (t.recipient or ""):
                raise TerminalError(f"recipient address {t.recipient!r} is not an email address")
            return self._line(t, now, subject=t.subject, message_id=t.message_id, in_reply_to=t.in_reply_to)
        return build_email(t, date=now).as_bytes()

    def _record(self, items: list[tuple[OutboundTouch, str, Any]], now: datetime) -> None:
        if self.settings.email_record == "jsonl":
            self._append(self.outbox / "email.jsonl", (line for _, _, line in items))
            return
        folder = self.outbox / "email"
        for t, _, raw in items:
            with open(folder / f"{_file_name(t.idempotency_key)}.eml", "wb") as fh:
                fh.write(raw)

    def _simulate(self, sim: _Simulation) -> None:
        r = sim.settings.rates
        hard, soft = r["email.bounced_hard"], r["email.bounced_soft"]
        bounce = sim.draw("bounce")
        if bounce < hard + soft:  # a bounce excludes everything else
            detail = "hard" if bounce < hard else "soft"
            sim.emit(EventKind.bounced, sim.at("email.bounced"), detail, {"reason": _BOUNCE_REASONS[detail]})
            return
        delivered = r["email.delivered"]
        if sim.draw("delivered") >= _share(delivered, 1 - hard - soft):
            return  # silently lost: no bounce, no tracking
        sim.emit(EventKind.delivered, sim.at("email.delivered"))
        opened = r["email.opened"]
        if sim.draw("opened") < _share(opened, delivered):
            opened_at = sim.at("email.opened")
            sim.emit(EventKind.opened, opened_at)
            if sim.draw("clicked") < _share(r["email.clicked"], opened):
                sim.emit(EventKind.clicked, sim.at("email.clicked", after=opened_at))
            if sim.draw("replied") < _share(r["email.replied"], opened):  # a reply implies an open
                replied_at = sim.at("email.replied", after=opened_at)
                sim.emit(EventKind.replied, replied_at)
                if sim.draw("meeting_booked") < r["email.meeting_booked_after_reply"]:
                    sim.emit(EventKind.meeting_booked, sim.at("email.meeting_booked", base=replied_at, after=replied_at))
        if sim.draw("auto_replied") < _share(r["email.auto_replied"], delivered):
            at = sim.at("email.auto_replied")
            back = (at + timedelta(days=3 + int(sim.draw("away_days") * 12))).date().isoformat()
            sim.emit(EventKind.auto_replied, at, back, {"return_date": back})
        if sim.draw("unsubscribed") < _share(r["email.unsubscribed"], delivered):
            sim.emit(EventKind.unsubscribed, sim.at("email.unsubscribed"))
        if sim.draw("complained") < _share(r["email.complained"], delivered):
            sim.emit(EventKind.complained, sim.at("email.complained"))


@register
class SandboxLinkedIn(_Sandbox):
    """Appends each action to linkedin.jsonl; invitations may be accepted, messages answered."""

    channel: ClassVar[Channel] = Channel.linkedin
    actions: ClassVar[frozenset[str]] = frozenset({"visit", "invite", "message"})

    def _prepare(self, t: OutboundTouch, now: datetime) -> Any:
        if t.action not in self.actions:
            raise TerminalError(f"sandbox linkedin: unknown action {t.action!r} (known: {', '.join(sorted(self.actions))})")
        return self._line(t, now)

    def _simulate(self, sim: _Simulation) -> None:
        r = sim.settings.rates
        if sim.sent.action == "invite" and sim.draw("accepted") < r["linkedin.accepted"]:
            sim.emit(EventKind.accepted, sim.at("linkedin.accepted"))
        elif sim.sent.action == "message" and sim.draw("replied") < r["linkedin.replied"]:
            sim.emit(EventKind.replied, sim.at("linkedin.replied"))


@register
class SandboxCall(_Sandbox):
    """Appends each call to call.jsonl; every call ends with exactly one outcome."""

    channel: ClassVar[Channel] = Channel.call

    def _simulate(self, sim: _Simulation) -> None:
        r = sim.settings.rates
        possible = [(name, r[f"call.{name}"]) for name in CALL_OUTCOMES if r[f"call.{name}"] > 0]
        point = sim.draw("outcome") * sum(w for _, w in possible)
        outcome = possible[-1][0]  # if rounding leaves the point at the very top
        for name, weight in possible:
            if point < weight:
                outcome = name
                break
            point -= weight
        at = sim.at("call.outcome")
        sim.emit(CALL_OUTCOMES[outcome], at, outcome)
        if outcome == "connected":
            verdict = sim.draw("verdict")
            if verdict < r["call.meeting_booked_after_connected"]:
                sim.emit(EventKind.meeting_booked, sim.at("call.meeting_booked", base=at))
            elif verdict < r["call.meeting_booked_after_connected"] + r["call.disqualified_after_connected"]:
                sim.emit(EventKind.disqualified, sim.at("call.meeting_booked", base=at))

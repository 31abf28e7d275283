"""Reading the senders' inboxes over IMAP: replies, auto-replies, bounces and complaints.

`poll_mailboxes` is what the SMTP connector's `poll` calls. For each mailbox with `imap`
settings it opens the configured folder read-only (EXAMINE, and BODY.PEEK so the SDR's
unread mail stays unread), reads the messages after the last seen UID, classifies each with
relance.classify and yields InboundEvents for ingest to match and apply.

The cursor (mailbox, folder, UIDVALIDITY, last UID) lives in the store's `mailbox_cursors`.

When it moves. The events of a folder are yielded first; its cursor is saved when the
consumer comes back for more after the folder's last event, so a consumer that stops early
(an exception in ingest closes the generator) leaves it where it was. A consumer may still
take the events and die before ingest commits them (`list(poll(...))` then ingest), so the
cursor also remembers where that batch started and the dedupe key of its last event: if the
event log does not have that key at the next poll, the batch is read again (at most
MAX_REPLAYS times, so a consumer that drops events on purpose cannot loop forever). Reading a
message twice is harmless: its events' dedupe keys come from its Message-ID, not its UID.

UIDVALIDITY. UIDs mean nothing across a change of UIDVALIDITY (a folder deleted and
recreated, a server migration), so the folder is read again from its messages of the last
FIRST_READ_DAYS days, exactly as on the very first poll; dedupe keys absorb the overlap.

One message that cannot be fetched or parsed is logged and skipped, never the others; one
mailbox that cannot be reached is logged (and appended to `errors` when given) and the other
mailboxes are still read: raising after handing over events would lose them.
"""

from __future__ import annotations

import base64
import hashlib
import imaplib
import logging
import re
import socket
import ssl
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from connectors.mail_secrets import server_password
from relance.channels import InboundEvent
from relance.classify import Classification, classify
from relance.config import Mailbox, MailServer
from relance.errors import ConfigError, RelanceError, TerminalError, TransientError
from relance.events import Channel
from relance.store import events, mailbox_cursors, touches

if TYPE_CHECKING:
    from relance.workspace import Workspace

__all__ = ["poll_mailboxes", "connect", "FIRST_READ_DAYS", "MAX_MESSAGES_PER_POLL"]

log = logging.getLogger("connectors.imap")

FIRST_READ_DAYS = 30  # a new cursor (or a new UIDVALIDITY) reads this far back, not years of mail
MAX_MESSAGES_PER_POLL = 500  # per folder and call; ingest.poll_all calls again until nothing is left
FETCH_CHUNK = 50  # messages per UID FETCH round trip
MAX_REPLAYS = 3
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def poll_mailboxes(
    workspace: Workspace,
    mailboxes: Iterable[Mailbox],
    now: datetime,
    *,
    tls: ssl.SSLContext | None = None,
    errors: list[RelanceError] | None = None,
) -> Iterator[InboundEvent]:
    """Events from every mailbox's IMAP folder since its cursor. A generator: cursors move
    as it is consumed (see the module docstring). `tls` replaces the system's trust store
    (a private CA); `errors` collects the mailboxes that could not be read."""
    for box in mailboxes:
        if box.imap is None:
            continue
        try:
            yield from _Reader(workspace, box, box.imap, now, tls).events()
        except RelanceError as exc:
            log.error("IMAP mailbox %s: %s", box.email, exc)
            if errors is not None:
                errors.append(exc)


def connect(server: MailServer, key: str, tls: ssl.SSLContext | None = None) -> imaplib.IMAP4:
    """A logged-in connection with the security the settings ask for (STARTTLS, SSL, none)."""
    password = server_password(server, key) if server.username else None  # a missing secret fails before dialling
    context = tls or ssl.create_default_context()
    try:
        if server.security == "ssl":
            conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(server.host, server.port, ssl_context=context, timeout=server.timeout_seconds)
        else:
            conn = imaplib.IMAP4(server.host, server.port, timeout=server.timeout_seconds)
            if server.security == "starttls":
                try:
                    conn.starttls(ssl_context=context)
                except BaseException:
                    _close(conn)
                    raise
    except ssl.SSLCertVerificationError as exc:
        raise TerminalError(f"IMAP server {server.host}:{server.port}: certificate rejected ({exc.verify_message})") from None
    except (OSError, imaplib.IMAP4.error) as exc:  # refused, timed out, TLS or STARTTLS failure
        raise TransientError(f"IMAP server {server.host}:{server.port} unreachable: {exc}") from None
    if server.username:
        try:
            conn.login(server.username, password or "")
        except (OSError, imaplib.IMAP4.abort) as exc:
            _close(conn)
            raise TransientError(f"IMAP login to {server.host} interrupted: {exc}") from None
        except imaplib.IMAP4.error as exc:
            _close(conn)
            raise TerminalError(f"IMAP login refused for {server.username} at {server.host}: {_text(exc.args[0] if exc.args else exc)}") from None
    return conn


@dataclass
class _Cursor:
    uidvalidity: int
    last_uid: int
    previous_uid: int | None
    check_key: str | None
    replayed: int


class _Reader:
    """One mailbox's folder, for one poll."""

    def __init__(self, workspace: Workspace, box: Mailbox, server: MailServer, now: datetime, tls: ssl.SSLContext | None):
        self.ws, self.box, self.server, self.now, self.tls = workspace, box, server, now, tls
        self.store = workspace.store
        self.folder = server.folder

    def events(self) -> Iterator[InboundEvent]:
        conn = connect(self.server, f"senders[{self.box.email}].imap", self.tls)
        try:
            yield from self._folder(conn)
        except (OSError, imaplib.IMAP4.abort) as exc:
            raise TransientError(f"IMAP connection to {self.server.host} lost: {exc}") from None
        finally:
            _close(conn)

    # ------------------------------------------------------------------ cursor
    def _folder(self, conn: imaplib.IMAP4) -> Iterator[InboundEvent]:
        typ, data = conn.select(_quote(folder_on_the_wire(self.folder)), readonly=True)
        if typ != "OK":
            raise ConfigError(f"IMAP folder {self.folder!r} cannot be opened: {_text(data)}", key=f"senders[{self.box.email}].imap.folder")
        uidvalidity = _number(conn.response("UIDVALIDITY")[1])
        uidnext = _number(conn.response("UIDNEXT")[1])
        cursor = self._load()
        replays = 0
        after: int | None
        start: int | None
        if cursor is None or cursor.uidvalidity != uidvalidity:
            if cursor is not None:
                log.warning("IMAP %s/%s: UIDVALIDITY changed (%s -> %s), reading the folder again",
                            self.box.email, self.folder, cursor.uidvalidity, uidvalidity)
            after = start = None  # None: by arrival date, the last FIRST_READ_DAYS
        else:
            after = start = cursor.last_uid
            if cursor.check_key and not self._recorded(cursor.check_key):
                if cursor.replayed < MAX_REPLAYS:
                    after = start = cursor.previous_uid
                    replays = cursor.replayed + 1
                    log.warning("IMAP %s/%s: the last batch never reached the event log, reading it again",
                                self.box.email, self.folder)
                else:
                    log.error("IMAP %s/%s: events after UID %s were handed over %d times and never recorded; moving on",
                              self.box.email, self.folder, cursor.previous_uid, cursor.replayed + 1)
        uids = self._search(conn, after)[:MAX_MESSAGES_PER_POLL]
        last_key: str | None = None
        for chunk in (uids[i : i + FETCH_CHUNK] for i in range(0, len(uids), FETCH_CHUNK)):
            for event in self._chunk(conn, chunk, uidvalidity):
                last_key = event.dedupe_key
                yield event
        # Every event of the folder is handed over and the consumer asked for more.
        if uids:
            last = uids[-1]
        elif cursor is None or cursor.uidvalidity != uidvalidity:
            last = max(uidnext - 1, 0)  # nothing recent: start after what is there now
        else:
            last = cursor.last_uid
        fresh = _Cursor(uidvalidity, last, start, last_key, replays)
        if cursor != fresh:
            self._save(fresh)

    def _load(self) -> _Cursor | None:
        with self.store.connect() as c:
            row = c.execute(
                select(mailbox_cursors).where(mailbox_cursors.c.mailbox == self.box.email, mailbox_cursors.c.folder == self.folder)
            ).first()
        if row is None:
            return None
        return _Cursor(row.uidvalidity, row.last_uid, row.previous_uid, row.check_key, row.replayed)

    def _save(self, cursor: _Cursor) -> None:
        values = {
            "mailbox": self.box.email, "folder": self.folder, "uidvalidity": cursor.uidvalidity, "last_uid": cursor.last_uid,
            "previous_uid": cursor.previous_uid, "check_key": cursor.check_key, "replayed": cursor.replayed, "updated_at": self.now,
        }
        dialect_insert = postgresql.insert if self.store.is_postgres else sqlite.insert
        stmt = dialect_insert(mailbox_cursors).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["mailbox", "folder"], set_={k: stmt.excluded[k] for k in values if k not in ("mailbox", "folder")}
        )
        with self.store.begin() as c:
            c.execute(stmt)

    def _recorded(self, key: str) -> bool:
        with self.store.connect() as c:
            return c.execute(select(events.c.id).where(events.c.dedupe_key == key).limit(1)).first() is not None

    # ------------------------------------------------------------------ messages
    def _search(self, conn: imaplib.IMAP4, after: int | None) -> list[int]:
        if after is None:
            since = (self.now - timedelta(days=FIRST_READ_DAYS)).date()
            typ, data = conn.uid("SEARCH", None, "SINCE", f"{since.day:02d}-{_MONTHS[since.month - 1]}-{since.year}")
        else:
            typ, data = conn.uid("SEARCH", None, "UID", f"{after + 1}:*")
        if typ != "OK":
            raise TransientError(f"IMAP SEARCH failed in {self.folder!r}: {_text(data)}")
        found = sorted({int(n) for n in b" ".join(d for d in data if isinstance(d, bytes)).split() if n.isdigit()})
        return [u for u in found if after is None or u > after]  # "n:*" always matches the last message

    def _chunk(self, conn: imaplib.IMAP4, uids: Sequence[int], uidvalidity: int) -> list[InboundEvent]:
        fetched = self._fetch(conn, uids)
        verdicts: list[tuple[int, Classification]] = []
        for uid in uids:
            raw = fetched.get(uid)
            if raw is None:
                log.warning("IMAP %s/%s: UID %s could not be fetched, skipped", self.box.email, self.folder, uid)
                continue
            verdict = classify(raw, received_at=self.now, own_addresses=(self.box.email,))
            if verdict.kind is None:
                log.info("IMAP %s/%s UID %s: not a response (%s)", self.box.email, self.folder, uid, verdict.reason)
                continue
            verdicts.append((uid, verdict))
        ours = self._our_message_ids({mid for _, v in verdicts for mid in _candidates(v)})
        out: list[InboundEvent] = []
        for uid, verdict in verdicts:
            try:
                out.extend(self._events(uid, uidvalidity, verdict, fetched[uid], ours))
            except Exception as exc:  # noqa: BLE001 - one odd message never stops the others
                log.warning("IMAP %s/%s UID %s: skipped (%s)", self.box.email, self.folder, uid, exc)
        return out

    def _fetch(self, conn: imaplib.IMAP4, uids: Sequence[int]) -> dict[int, bytes]:
        typ, data = conn.uid("FETCH", ",".join(str(u) for u in uids), "(UID BODY.PEEK[])")
        if typ != "OK":
            raise TransientError(f"IMAP FETCH failed in {self.folder!r}: {_text(data)}")
        found: dict[int, bytes] = {}
        for item in data:
            if isinstance(item, tuple) and len(item) >= 2 and isinstance(item[1], bytes):
                m = re.search(rb"UID (\d+)", item[0])
                if m:
                    found[int(m.group(1))] = item[1]
        return found

    def _our_message_ids(self, candidates: set[str]) -> set[str]:
        """Which Message-IDs are our touches', so the event names the right one to ingest."""
        if not candidates:
            return set()
        with self.store.connect() as c:
            return set(c.execute(select(touches.c.message_id).where(touches.c.message_id.in_(sorted(candidates)))).scalars())

    def _events(self, uid: int, uidvalidity: int, v: Classification, raw: bytes, ours: set[str]) -> list[InboundEvent]:
        assert v.kind is not None
        matched = next((mid for mid in _candidates(v) if mid in ours), None)
        message_id = matched or (v.match_ids[0] if v.match_ids else None)
        identity = f"{v.message_id}\x00{(v.from_address or '').lower()}" if v.message_id else raw
        digest = hashlib.sha256(identity.encode("utf-8", "replace") if isinstance(identity, str) else identity).hexdigest()[:40]
        occurred = min(v.sent_at, self.now) if v.sent_at is not None else self.now
        payload = {
            "mailbox": self.box.email, "folder": self.folder, "uid": uid, "uidvalidity": uidvalidity,
            "message_id": v.message_id, "match_ids": list(v.match_ids[:10]), "from": v.from_address,
            "subject": v.subject[:200], "reason": v.reason,
        }
        if v.status or v.diagnostic:
            payload.update(status=v.status, diagnostic=v.diagnostic)
        if v.return_date is not None:
            payload["return_date"] = v.return_date.isoformat()
        about = v.about or (None,)
        return [
            InboundEvent(
                kind=v.kind,
                channel=Channel.email,
                occurred_at=occurred,
                dedupe_key=(f"imap:{digest}" + (f":{addr.lower()}" if len(about) > 1 and addr else ""))[:300],  # ingest keeps 300
                message_id=message_id,
                recipient=addr,
                detail=v.detail,
                payload=payload,
            )
            for addr in about
        ]


def _candidates(v: Classification) -> tuple[str, ...]:
    """The ids worth a lookup: the most specific ones, and the thread's root (a long thread
    started by our first email keeps it first in References)."""
    return v.match_ids[:12] + v.references[:1]


def folder_on_the_wire(name: str) -> str:
    """A folder name as IMAP spells it (RFC 3501 5.1.3, modified UTF-7): printable ASCII as it
    is, `&` as `&-`, any other run of characters as `&`, the base64 of its UTF-16 (`,` for
    `/`, no padding), `-`. "Réponses" is "R&AOk-ponses" to the server."""
    out: list[str] = []
    run: list[str] = []

    def close_run() -> None:
        if run:
            encoded = base64.b64encode("".join(run).encode("utf-16-be")).decode().rstrip("=")
            out.append(f"&{encoded.replace('/', ',')}-")
            run.clear()

    for char in name:
        if " " <= char <= "~":
            close_run()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    close_run()
    return "".join(out)


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(values: list | None) -> int:
    try:
        return int((values or [b"0"])[0])
    except (TypeError, ValueError):
        return 0


def _text(data: object) -> str:
    if isinstance(data, (list, tuple)):
        data = b" ".join(d for d in data if isinstance(d, bytes)) if any(isinstance(d, bytes) for d in data) else str(data)
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


def _close(conn: imaplib.IMAP4) -> None:
    try:
        conn.logout()
    except (OSError, imaplib.IMAP4.error, socket.timeout):
        pass

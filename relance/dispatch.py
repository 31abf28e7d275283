"""Dispatch: claim due enrollments, decide each one's touch, send by channel, record.

The three phases are separate calls so the Prefect flow can run one task per batch and
channel, and so that a touch row exists in state `sending` *before* the provider is called:
after a crash such a touch is reconciled, never resent blindly.

    claim   -> lease a batch of due enrollments (FOR UPDATE SKIP LOCKED on PostgreSQL)
    prepare -> re-check exits, suppression, window, capacity; render; write touches
    deliver -> one connector call per channel, then record outcomes and advance
"""

from __future__ import annotations

import gc
import os
import socket
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any

from sqlalchemy import bindparam, case, func, insert, literal, null, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from relance.calendar import zone_for
from relance.channels import Capability, OutboundTouch, Sender, SendResult
from relance.conditions import evaluate
from relance.email_message import make_message_id
from relance.enrollment import PROSPECT_COLUMNS
from relance.errors import Bounced, ConfigError, OutcomeUnknown, RelanceError, RenderError, TerminalError, TransientError
from relance.events import Channel, EventKind
from relance.planning import calendar_for, due_at, following, pick_variant, reply_subject, step_after, step_templates, touch_context
from relance.rendering import LINKEDIN_NOTE_LIMIT
from relance.rules import apply as apply_rules, ends, finish_enrollments
from relance.spec import Sequence, Step
from relance.store import BulkInsert, BulkWrite, UTCDateTime, among, datetime_param, enrollments, events, prospects, sender_locks, tasks, touches
from relance.suppression import suppressed_ids
from relance.tokens import UnsubscribeTokens, workspace_secret
from relance.workspace import Workspace

# The event a performed touch records, by channel and action.
PERFORMED = {
    ("email", "send"): EventKind.sent,
    ("linkedin", "visit"): EventKind.visited,
    ("linkedin", "invite"): EventKind.invited,
    ("linkedin", "message"): EventKind.messaged,
    ("call", "call"): EventKind.sent,
}
COUNTED_STATUSES = ("sending", "sent", "unknown", "task")
DONE_STATUSES = ("sent", "skipped", "task")
TOUCH_DEFAULTS = dict.fromkeys(
    ("variant", "sender", "recipient", "subject", "content_hash", "message_id", "provider_message_id", "error", "lease_owner", "sent_at")
)
RETRYABLE_STATUSES = ("retry", "failed")
# The hot path's writes (BulkInsert, BulkWrite): one row per touch or enrollment.
TOUCH_COLUMNS = (
    "enrollment_id", "prospect_id", "sequence", "step_id", "channel", "action", "idempotency_key", "status",
    "spec_version", "variant", "sender", "recipient", "subject", "content_hash", "message_id", "provider_message_id",
    "attempts", "error", "lease_owner", "created_at", "sent_at",
)  # fmt: skip
_touch_fields = itemgetter(*TOUCH_COLUMNS[:-2])  # all but the two datetimes, converted apart
INSERT_TOUCHES = BulkInsert("touches", TOUCH_COLUMNS)
UPDATE_TOUCHES = BulkWrite(  # (status, attempts, error, provider_message_id, sent_at, id)
    sqlite="UPDATE touches SET status = ?, attempts = ?, error = ?, provider_message_id = ?, sent_at = ?, lease_owner = NULL WHERE id = ?",
    postgres=(
        "UPDATE touches SET status = v.status, attempts = v.attempts, error = v.error, provider_message_id = v.pmid,"
        " sent_at = v.sent_at, lease_owner = NULL"
        " FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], %s::timestamp[], %s::bigint[]) AS v(status, attempts, error, pmid, sent_at, id)"
        " WHERE touches.id = v.id"
    ),
)
# Only an enrollment still active advances: a reply ingested meanwhile has ended it; and an
# auto-reply ingested meanwhile may have pushed its due time later: that one is kept.
ADVANCE_ENROLLMENTS = BulkWrite(  # (next step, due, now, id)
    sqlite=(
        "UPDATE enrollments SET next_step_id = ?1, next_due_at = CASE WHEN next_due_at > ?2 THEN next_due_at ELSE ?2 END,"
        " attempts = 0, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?3 WHERE id = ?4 AND state = 'active'"
    ),
    postgres=(
        "UPDATE enrollments SET next_step_id = v.step, next_due_at = CASE WHEN enrollments.next_due_at > v.due"
        " THEN enrollments.next_due_at ELSE v.due END, attempts = 0, lease_owner = NULL, lease_expires_at = NULL, updated_at = v.now"
        " FROM unnest(%s::text[], %s::timestamp[], %s::timestamp[], %s::bigint[]) AS v(step, due, now, id)"
        " WHERE enrollments.id = v.id AND enrollments.state = 'active'"
    ),
)
CAPACITY_REFRESH_SECONDS = 10.0


@contextmanager
def fewer_collections(threshold: int = 50_000) -> Iterator[None]:
    """A dispatch run allocates millions of short-lived objects (rows, dicts, rendered text)
    and almost no reference cycles, yet with the default thresholds the cyclic collector ran
    every 700 allocations and kept re-scanning the long-lived heap (SQLAlchemy, Jinja,
    Prefect): 5 to 10 % of a run. For the run, the heap that exists before it is frozen and
    the first threshold raised; both are restored after."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(threshold, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class DispatchSummary:
    claimed: int = 0
    sent: Counter[str] = field(default_factory=Counter)  # per channel
    failed: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    tasks: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    deferred: int = 0
    paused: int = 0
    exited: int = 0
    completed: int = 0
    errors: list[str] = field(default_factory=list)

    def merge(self, other: "DispatchSummary") -> None:
        self.claimed += other.claimed
        for name in ("sent", "failed", "retried", "tasks"):
            getattr(self, name).update(getattr(other, name))
        for name in ("skipped", "deferred", "paused", "exited", "completed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed,
            "sent": dict(self.sent),
            "failed": dict(self.failed),
            "retried": dict(self.retried),
            "tasks": dict(self.tasks),
            "skipped": self.skipped,
            "deferred": self.deferred,
            "paused": self.paused,
            "exited": self.exited,
            "completed": self.completed,
            "errors": self.errors[:50],
        }


@dataclass
class Batch:
    """What prepare decided: touches to send per channel, plus the bookkeeping it already did."""

    outbound: dict[Channel, list[OutboundTouch]] = field(default_factory=dict)
    summary: DispatchSummary = field(default_factory=DispatchSummary)


class Dispatcher:
    def __init__(self, ws: Workspace, owner: str | None = None):
        self.ws = ws
        self.store = ws.store
        self.owner = owner or worker_id()
        self.lease = timedelta(seconds=ws.config.dispatch.lease_seconds)
        self.batch_size = ws.config.dispatch.batch_size
        self.tokens = UnsubscribeTokens(workspace_secret(ws.root, ws.config.web.secret_env))
        self._capacity: tuple[datetime, float, _Capacity] | None = None
        self._clock: tuple[datetime, float] | None = None  # (a run's `now`, monotonic time it was first seen)
        self._claimed: dict[int, float] = {}  # a claimed batch's first id -> monotonic time of its leases

    def capacity(self, now: datetime) -> "_Capacity":
        """Rolling counts per sender, kept in memory for the batches that follow: re-counting a
        week of touches per batch made a run quadratic. Each batch adds what other workers
        sent meanwhile (`_Capacity.hold`); the whole week is counted again every
        CAPACITY_REFRESH_SECONDS, for the touches that have left the windows or failed."""
        if self._capacity is not None:
            at, loaded, counts = self._capacity
            if at == now and time.monotonic() - loaded < CAPACITY_REFRESH_SECONDS:
                return counts
        counts = _Capacity(self.ws, now)
        self._capacity = (now, time.monotonic(), counts)
        return counts

    # ---------------------------------------------------------------- claim
    def claim(self, now: datetime, limit: int | None = None) -> list[int]:
        """Lease up to `limit` due enrollments; two workers never hold the same one."""
        limit = limit or self.batch_size
        due = (
            select(enrollments.c.id)
            .where(
                enrollments.c.state == "active",
                enrollments.c.next_due_at <= now,
                or_(enrollments.c.lease_expires_at.is_(None), enrollments.c.lease_expires_at < now),
            )
            .order_by(enrollments.c.next_due_at)
            .limit(limit)
        )
        if self.store.is_postgres:
            due = due.with_for_update(skip_locked=True)
        stmt = (
            update(enrollments)
            .where(enrollments.c.id.in_(due.scalar_subquery()))
            .values(lease_owner=self.owner, lease_expires_at=self._lease_until(now))
            .returning(enrollments.c.id)
        )
        with self.store.begin() as conn:
            ids = sorted(conn.scalars(stmt))
        if ids:
            if len(self._claimed) >= 64:  # claims never prepared (a crashed task): forget them
                self._claimed.clear()
            self._claimed[ids[0]] = time.monotonic()
        return ids

    def _lease_until(self, now: datetime) -> datetime:
        """A lease runs from when it is handed out, not from the run's `now`: a run that started
        ten minutes ago must not hand out leases that already look expired to a run started
        since. So `now` is advanced by the real time elapsed since this run first used it (a
        simulated clock stays simulated)."""
        if self._clock is None or self._clock[0] != now:
            self._clock = (now, time.monotonic())
        return now + timedelta(seconds=time.monotonic() - self._clock[1]) + self.lease

    def renew(self, outbound: Seq[OutboundTouch], now: datetime) -> None:
        """Extend the leases of this worker's whole batch before a provider call, so that no
        part of it is taken for a dead worker's and reconciled while the batch is still being
        sent: its other channels, sent after this one, included. Leases handed out or renewed
        less than a third of their length ago are left as they are."""
        if not outbound:
            return
        lease = outbound[0].metadata.get("lease")  # shared by every touch of the batch (prepare)
        if lease is None:  # touches that did not come from prepare: renew their own enrollments
            lease = {"ids": [t.metadata["enrollment_id"] for t in outbound], "at": 0.0}
        if time.monotonic() - lease["at"] < self.lease.total_seconds() / 3:
            return
        renewed = time.monotonic()
        with self.store.begin() as conn:
            # On PostgreSQL the batch's channels send side by side: a row another channel's
            # record holds is being advanced (its lease released) and is skipped, never waited
            # for, which could deadlock with that record wanting a row this renewal took first.
            ours = (
                select(enrollments.c.id)
                .where(among(conn, enrollments.c.id, lease["ids"]), enrollments.c.lease_owner == self.owner)
                .with_for_update(skip_locked=True)
            )
            conn.execute(update(enrollments).where(enrollments.c.id.in_(ours.scalar_subquery())).values(lease_expires_at=self._lease_until(now)))
        lease["at"] = renewed

    # -------------------------------------------------------------- prepare
    def prepare(self, enrollment_ids: Seq[int], now: datetime) -> Batch:
        batch = Batch()
        batch.summary.claimed = len(enrollment_ids)
        if not enrollment_ids:
            return batch
        ids = sorted(enrollment_ids)
        # The batch's leases, and when they were handed out (0: unknown, renew): one record
        # for all its touches, whichever channel renews them.
        lease = {"ids": ids, "at": self._claimed.pop(ids[0], 0.0)}
        with self.store.begin() as conn:
            _Preparer(self, conn, now, batch).run(ids)
        for outbound in batch.outbound.values():
            for touch in outbound:
                touch.metadata["lease"] = lease
        return batch

    # -------------------------------------------------------------- deliver
    def deliver(self, channel: Channel, outbound: list[OutboundTouch], now: datetime) -> DispatchSummary:
        """Send one channel's touches, then record every outcome: in one connector call, or in
        calls of at most the connector's `max_batch` touches for a provider that sends one
        message at a time. Each call starts with the batch's leases renewed if they are aging,
        and its outcomes are recorded before the next call: a crash leaves at most one call's
        touches to reconcile."""
        connector = self.ws.connector(channel)
        size = getattr(type(connector), "max_batch", None) or len(outbound) or 1
        summary = DispatchSummary()
        for start in range(0, len(outbound), size):
            summary.merge(self._deliver(connector, channel, outbound[start : start + size], now))
        self.store.checkpoint_in_background()
        return summary

    def _deliver(self, connector: Any, channel: Channel, outbound: list[OutboundTouch], now: datetime) -> DispatchSummary:
        self.renew(outbound, now)
        try:
            results = connector.send_batch(outbound, now)
        except TransientError as exc:
            results = [SendResult(t.touch_id, error=exc) for t in outbound]
        except TerminalError as exc:
            results = [SendResult(t.touch_id, error=exc) for t in outbound]
        by_id = {r.touch_id: r for r in results}
        missing = [t for t in outbound if t.touch_id not in by_id]
        for touch in missing:  # a connector that forgets a touch: its fate is unknown
            by_id[touch.touch_id] = SendResult(touch.touch_id, error=OutcomeUnknown("connector returned no result"))
        return self.record(channel, outbound, by_id, now)

    def record(self, channel: Channel, outbound: list[OutboundTouch], results: Mapping[int, SendResult], now: datetime) -> DispatchSummary:
        summary = DispatchSummary()
        touch_updates: list[tuple[Any, ...]] = []
        performed: dict[EventKind, list[int]] = defaultdict(list)  # event kind -> touch ids
        advance: list[tuple[int, str | None, datetime | None]] = []
        retry: list[dict[str, Any]] = []
        pause: list[dict[str, Any]] = []
        failures: list[tuple[OutboundTouch, str]] = []
        max_attempts = self.ws.config.dispatch.max_attempts
        name = channel.value
        for touch in outbound:
            meta = touch.metadata
            result = results[touch.touch_id]
            attempts = meta["attempts"] + 1
            if result.error is None:
                touch_updates.append(("sent", attempts, None, result.provider_message_id, now, touch.touch_id))
                performed[PERFORMED[(name, touch.action)]].append(touch.touch_id)
                advance.append((meta["enrollment_id"], meta["next_step_id"], meta["next_due_at"]))
            elif isinstance(result.error, TransientError) and attempts < max_attempts:
                summary.retried[name] += 1
                touch_updates.append(("retry", attempts, str(result.error), None, None, touch.touch_id))
                delay = max(result.error.retry_after or 0.0, 60.0 * 2 ** (attempts - 1))
                retry.append({"e_id": meta["enrollment_id"], "due": now + timedelta(seconds=min(delay, 6 * 3600)), "now": now})
            elif isinstance(result.error, OutcomeUnknown):
                summary.failed[name] += 1
                touch_updates.append(("unknown", attempts, str(result.error), None, None, touch.touch_id))
                pause.append({"e_id": meta["enrollment_id"], "reason": f"send outcome unknown: {result.error}", "now": now})
            else:
                summary.failed[name] += 1
                reason = f"{type(result.error).__name__}: {result.error}"
                touch_updates.append(("failed", attempts, reason, None, None, touch.touch_id))
                failures.append((touch, reason))
        if advance:
            summary.sent[name] += len(advance)
        with self.store.begin() as conn:
            at = datetime_param(conn.dialect)
            UPDATE_TOUCHES.run(conn, [(*u[:4], at(u[4]), u[5]) for u in touch_updates])
            for kind, ids in performed.items():
                conn.execute(_performed_events(kind, among(conn, touches.c.id, ids), now))
            ADVANCE_ENROLLMENTS.run(conn, [(step, at(due), at(now), e_id) for e_id, step, due in advance])
            done = [e_id for e_id, step, _ in advance if step is None]
            if done:
                summary.completed += len(done)
                finish_enrollments(conn, self.ws, done, "completed", "all steps done", now)
            if retry:
                conn.execute(
                    update(enrollments)
                    .where(enrollments.c.id == bindparam("e_id"), enrollments.c.state == "active")
                    .values(
                        next_due_at=bindparam("due"),
                        attempts=enrollments.c.attempts + 1,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=bindparam("now"),
                    ),
                    retry,
                )
            bounces = []
            for touch, reason in failures:
                conn.execute(insert(events), [_event_row(touch, EventKind.failed, now, f"touch:{touch.idempotency_key}:failed", detail=reason[:200])])
                error = results[touch.touch_id].error
                if isinstance(error, Bounced):  # refused at send time: a bounce like any other
                    bounce = _event_row(touch, EventKind.bounced, now, f"touch:{touch.idempotency_key}:bounced", detail="hard" if error.hard else "soft")
                    bounce["payload"] = {"reason": str(error)[:500]}
                    conn.execute(insert(events), [bounce])
                    bounces.append(bounce)
                pause.append({"e_id": touch.metadata["enrollment_id"], "reason": f"step {touch.metadata['step_id']!r} failed: {reason}", "now": now})
            if bounces:
                apply_rules(conn, self.ws, bounces, now)  # suppress the address, end the cadence
            if pause:
                summary.paused += len(pause)
                _pause(conn, pause)
        for touch, reason in failures:
            summary.errors.append(f"touch {touch.idempotency_key}: {reason}")
        return summary

    # ------------------------------------------------------------ reconcile
    def reconcile(self, now: datetime) -> int:
        """Touches left `sending` by a dead worker: resend only through an idempotent provider
        (it dedupes on our key); otherwise flag them `unknown` and pause for a person."""
        dead = or_(enrollments.c.lease_expires_at.is_(None), enrollments.c.lease_expires_at < now)
        with self.store.begin() as conn:
            stale = conn.execute(
                select(touches.c.id, touches.c.channel, touches.c.enrollment_id, touches.c.lease_owner)
                .join(enrollments, enrollments.c.id == touches.c.enrollment_id)
                .where(touches.c.status == "sending", dead)
            ).all()
            resume, unknown = [], []
            for row in stale:
                caps = type(self.ws.connector(Channel(row.channel))).capabilities
                (resume if Capability.idempotent_send in caps else unknown).append((row.id, row.lease_owner))

            def take(rows: list[tuple[int, str]], status: str, error: str) -> list[int]:
                # Another worker may have reconciled and resumed one of them since we read it:
                # only a touch still `sending` for the worker that died is ours to change.
                if not rows:
                    return []
                return list(conn.scalars(
                    update(touches)
                    .where(tuple_(touches.c.id, touches.c.lease_owner).in_(rows), touches.c.status == "sending")
                    .values(status=status, error=error, lease_owner=None)
                    .returning(touches.c.enrollment_id)
                ))

            resumed = take(resume, "retry", "resumed after a crash")
            if resumed:
                conn.execute(
                    update(enrollments)
                    .where(enrollments.c.id.in_(resumed), dead)
                    .values(lease_owner=None, lease_expires_at=None, next_due_at=now, updated_at=now)
                )
            flagged = take(unknown, "unknown", "worker died during send")
            if flagged:
                _pause(conn, [{"e_id": e, "reason": "send outcome unknown after a crash: check the provider, then resume", "now": now} for e in flagged])
        return len(stale)

    # ------------------------------------------------------------------ run
    def run(self, now: datetime, max_batches: int | None = None) -> DispatchSummary:
        """Everything due at `now`, batch after batch, without Prefect (tests, bench, preview)."""
        total = DispatchSummary()
        self.reconcile(now)
        count = 0
        with fewer_collections():
            while max_batches is None or count < max_batches:
                ids = self.claim(now)
                if not ids:
                    break
                count += 1
                batch = self.prepare(ids, now)
                total.merge(batch.summary)
                for channel, outbound in batch.outbound.items():
                    total.merge(self.deliver(channel, outbound, now))
        return total


def _performed_events(kind: EventKind, these_touches: Any, now: datetime) -> Any:
    """The events of touches just performed, copied from their rows in one statement."""
    at = literal(now, UTCDateTime())
    return insert(events).from_select(
        ["occurred_at", "recorded_at", "kind", "channel", "detail", "prospect_id", "enrollment_id", "touch_id",
         "sequence", "step_id", "variant", "sender", "payload", "dedupe_key"],
        select(
            at, at, literal(kind.value), touches.c.channel, null(), touches.c.prospect_id, touches.c.enrollment_id,
            touches.c.id, touches.c.sequence, touches.c.step_id, touches.c.variant, touches.c.sender,
            literal({}, events.c.payload.type), "touch:" + touches.c.idempotency_key + ":performed",
        ).where(these_touches),
    )  # fmt: skip


def _event_row(touch: OutboundTouch, kind: EventKind, now: datetime, dedupe: str, detail: str | None = None) -> dict[str, Any]:
    meta = touch.metadata
    return {
        "occurred_at": now,
        "recorded_at": now,
        "kind": kind.value,
        "channel": touch.channel.value,
        "detail": detail,
        "prospect_id": meta["prospect_id"],
        "enrollment_id": meta["enrollment_id"],
        "touch_id": touch.touch_id,
        "sequence": meta["sequence"],
        "step_id": meta["step_id"],
        "variant": meta.get("variant"),
        "sender": touch.sender.address,
        "payload": {},
        "dedupe_key": dedupe,
    }


def _pause(conn: Any, rows: list[dict[str, Any]]) -> None:
    conn.execute(
        update(enrollments)
        .where(enrollments.c.id == bindparam("e_id"), enrollments.c.state == "active")
        .values(state="paused", reason=bindparam("reason"), lease_owner=None, lease_expires_at=None, updated_at=bindparam("now")),
        rows,
    )


class _Preparer:
    """One batch's decisions, in one transaction."""

    def __init__(self, dispatcher: Dispatcher, conn: Any, now: datetime, batch: Batch):
        self.d = dispatcher
        self.ws = dispatcher.ws
        self.conn = conn
        self.now = now
        self.batch = batch
        self.summary = batch.summary
        self.new_touches: list[tuple[dict[str, Any], OutboundTouch | None, dict[str, Any] | None]] = []
        self.enrollment_updates: list[dict[str, Any]] = []
        self.pauses: list[dict[str, Any]] = []
        self.finished: dict[str, list[int]] = defaultdict(list)  # kind -> enrollment ids
        self.events: list[dict[str, Any]] = []
        self._manual: dict[Channel, bool] = {}
        self._senders: dict[tuple[bool, str | None, str | None], Sender | None] = {}
        self._sender_vars: dict[Sender, dict[str, str]] = {}
        self.unsubscribe_base = f"{self.ws.config.web.base_url.rstrip('/')}/u/"

    def run(self, ids: list[int]) -> None:
        conn = self.conn
        rows = conn.execute(
            select(enrollments.c.id, enrollments.c.sequence, enrollments.c.next_step_id, enrollments.c.sender, *PROSPECT_COLUMNS)
            .join(prospects, prospects.c.id == enrollments.c.prospect_id)
            .where(among(conn, enrollments.c.id, ids), enrollments.c.lease_owner == self.d.owner, enrollments.c.state == "active")
        ).all()
        names = [c.name for c in PROSPECT_COLUMNS]
        self.prospect_of = {r[0]: dict(zip(names, r[4:])) for r in rows}
        self.suppressed = suppressed_ids(conn, list(self.prospect_of.values()))
        self.history: dict[int, list[Any]] = defaultdict(list)
        for t in conn.execute(
            select(touches.c.enrollment_id, touches.c.id, touches.c.step_id, touches.c.status, touches.c.message_id, touches.c.subject, touches.c.attempts).where(
                among(conn, touches.c.enrollment_id, ids)
            )
        ):
            self.history[t.enrollment_id].append(t)
        self.seen: dict[int, list[tuple[str, str | None]]] = defaultdict(list)
        self.details: dict[int, list[tuple[str, str | None]]] = defaultdict(list)  # (kind, detail): what may end it
        for e in conn.execute(
            select(events.c.enrollment_id, events.c.kind, events.c.step_id, events.c.detail).where(among(conn, events.c.enrollment_id, ids))
        ):
            self.seen[e.enrollment_id].append((e.kind, e.step_id))
            self.details[e.enrollment_id].append((e.kind, e.detail))
        self.capacity = self.d.capacity(self.now)
        self.capacity.hold(conn, self.possible_senders(rows), self.d.owner)
        for row in rows:
            try:
                self.decide(row)
            except ConfigError:
                raise  # the workspace is broken, not this prospect: fail the run loudly
            except RelanceError as exc:  # one prospect's problem never stops the batch
                self.pause(row.id, str(exc))
        self.flush()

    # One enrollment -------------------------------------------------------
    def decide(self, row: Any) -> None:
        seq = self.ws.sequences.get(row.sequence)
        if seq is None:
            return self.pause(row.id, f"sequence {row.sequence!r} is no longer in the workspace")
        prospect = self.prospect_of[row.id]
        history = self.history.get(row.id, ())
        step = step_after(seq, [t.step_id for t in history if t.status in DONE_STATUSES], row.next_step_id)
        if step is None:
            return self.finish(row.id, "completed")
        if history:
            if any(t.step_id == step.id and t.status in DONE_STATUSES for t in history):  # ran already
                return self.move(row.id, following(seq, step.id), prospect, seq)
            if any(t.step_id == step.id and t.status == "unknown" for t in history):
                return self.pause(row.id, f"step {step.id!r}: send outcome unknown, reconcile it before resuming")
        details = self.details.get(row.id)
        if details:
            ending = next((kind for kind, detail in details if ends(seq, kind, detail)), None)
            if ending is not None:
                return self.finish(row.id, ending)
        if prospect["id"] in self.suppressed and step.channel != Channel.task:
            return self.finish(row.id, "suppressed", reason=self.suppressed[prospect["id"]])
        cal = calendar_for(seq.schedule, prospect, self.ws.config)
        if not cal.is_open(self.now):
            self.summary.deferred += 1
            return self.reschedule(row.id, due_at(seq, None, prospect, self.ws.config, self.now))
        if step.when and not evaluate(step.when, prospect, self.seen.get(row.id, ())):
            return self.skip(row, seq, step, prospect, "condition not met")
        recipient = _recipient(step, prospect)
        if recipient is None:
            return self.skip(row, seq, step, prospect, f"no {step.channel.value} contact for this prospect")
        sender = self.sender_for(row, seq, step)
        if sender is None:
            return self.pause(row.id, f"sender {row.sender!r} is no longer in config.yaml: assign a mailbox, then resume")
        if not self.capacity.take(sender.address, step, recipient):
            self.summary.deferred += 1
            later = self.capacity.retry_at(step)
            return self.reschedule(row.id, due_at(seq, None, prospect, self.ws.config, later))
        manual = self.manual(step.channel)
        retry_touch = next((t for t in history if t.step_id == step.id and t.status in RETRYABLE_STATUSES), None) if history else None
        self.touch(row, seq, step, prospect, recipient, sender, manual, retry_touch, history)

    def manual(self, channel: Channel) -> bool:
        """Whether this channel's touches become tasks for a person rather than sends."""
        if channel not in self._manual:
            self._manual[channel] = channel == Channel.task or Capability.manual in type(self.ws.connector(channel)).capabilities
        return self._manual[channel]

    def sender_for(self, row: Any, seq: Sequence, step: Step) -> Sender | None:
        return self._sender(row.sender, seq, step.channel == Channel.email)

    def sender_vars(self, sender: Sender) -> dict[str, str]:
        """What templates see of a sender: one dict per sender, shared by its touches."""
        if sender not in self._sender_vars:
            self._sender_vars[sender] = {"name": sender.name, "email": sender.address, "signature": sender.signature}
        return self._sender_vars[sender]

    def possible_senders(self, rows: Seq[Any]) -> set[str]:
        """Whoever may send a touch of these enrollments, whatever their next step's channel."""
        found = set()
        for name, sticky in {(row[1], row[3]) for row in rows}:  # (sequence, sender): a handful per batch
            if seq := self.ws.sequences.get(name):
                found.update(s.address for s in (self._sender(sticky, seq, True), self._sender(sticky, seq, False)) if s is not None)
        return found

    def _sender(self, sticky: str | None, seq: Sequence, email: bool) -> Sender | None:
        key = (email, sticky, seq.owner)
        if key not in self._senders:
            self._senders[key] = self._identity(sticky, seq.owner, email)
        return self._senders[key]

    def _identity(self, sticky: str | None, owner: str | None, email: bool) -> Sender | None:
        if email:
            box = self.ws.config.mailbox(sticky) if sticky else None
            return Sender(box.email, box.name, box.signature) if box else None
        owner = owner or sticky or "unassigned"
        box = self.ws.config.mailbox(owner)
        return Sender(owner, box.name if box else owner, box.signature if box else "")

    def touch(self, row, seq, step, prospect, recipient, sender, manual, retry_touch, history) -> None:
        key = f"{row.id}:{step.id}"
        variant = pick_variant(step.email.variants, seq.name, step.id, prospect["id"]) if step.email else None
        template, subject_override = step_templates(step, variant)
        thread = _thread(step, history)
        # Signed per prospect: made for an email (its List-Unsubscribe header), for another
        # channel only if its template shows the link.
        if step.email or (template is not None and self.ws.renderer.uses(template, "unsubscribe_url")):
            unsubscribe_url = f"{self.unsubscribe_base}{self.d.tokens.make(prospect['id'], row.id)}"
        else:
            unsubscribe_url = None
        context = touch_context(self.ws.config, seq, step, prospect, self.sender_vars(sender), unsubscribe_url)
        nxt = following(seq, step.id)
        # The touch row, complete, in one dict that is also the outbound touch's metadata:
        # a batch builds thousands of them.
        values = {
            "enrollment_id": row.id, "prospect_id": prospect["id"], "sequence": seq.name, "step_id": step.id,
            "channel": step.channel.value, "action": step.action, "idempotency_key": key,
            "status": "task" if manual else "sending", "spec_version": seq.version, "variant": variant.id if variant else None,
            "sender": sender.address, "recipient": recipient, "subject": None, "content_hash": None, "message_id": None,
            "provider_message_id": None, "attempts": retry_touch.attempts if retry_touch else 0, "error": None,
            "lease_owner": None if manual else self.d.owner, "created_at": self.now, "sent_at": None,
        }  # fmt: skip
        if retry_touch is not None:
            values["id"] = retry_touch.id
        try:
            rendered = self.ws.renderer.render(template, context, subject_override) if template else None
            subject = rendered.subject if rendered else None
            if step.email and thread is not None:
                subject = subject or reply_subject(thread.subject)
            if step.email and not subject:
                raise RenderError(f"{template}: the email has no subject")
            if step.linkedin and step.action == "invite" and rendered and len(rendered.body.strip()) > LINKEDIN_NOTE_LIMIT:
                raise RenderError(f"{template}: LinkedIn note is {len(rendered.body.strip())} characters, the limit is {LINKEDIN_NOTE_LIMIT}")
        except RenderError as exc:
            self.summary.failed[step.channel.value] += 1
            self.summary.errors.append(f"enrollment {row.id} step {step.id}: {exc}")
            values.update(status="failed", error=str(exc), lease_owner=None)
            self.new_touches.append((values, None, None))
            self.events.append(_raw_event(values, EventKind.failed, self.now, detail="render", dedupe=f"touch:{key}:render:{self.now.isoformat()}"))
            return self.pause(row.id, f"step {step.id!r}: {exc}")
        message_id = values["message_id"] = make_message_id(sender.address, key) if step.email else None
        values["subject"] = subject
        if rendered:
            values["content_hash"] = rendered.content_hash
        values["next_step_id"] = nxt.id if nxt else None
        values["next_due_at"] = due_at(seq, nxt, prospect, self.ws.config, self.now) if nxt else None
        values["date"] = self.now
        outbound = OutboundTouch(
            touch_id=retry_touch.id if retry_touch else 0,
            idempotency_key=key,
            channel=step.channel,
            action=step.action,
            recipient=recipient,
            recipient_name=" ".join(p for p in (prospect.get("first_name"), prospect.get("last_name")) if p),
            sender=sender,
            subject=subject,
            body=rendered.body if rendered else "",
            message_id=message_id,
            in_reply_to=thread.message_id if thread is not None else None,
            references=(thread.message_id,) if thread is not None and thread.message_id else (),
            unsubscribe_url=unsubscribe_url if step.email else None,
            unsubscribe_mailto=f"mailto:{sender.address}?subject=unsubscribe" if step.email else None,
            metadata=values,
        )
        task = None
        if manual:
            self.summary.tasks[step.channel.value] += 1
            title = step.task.title if step.task else f"{step.action.capitalize()} {outbound.recipient_name or recipient} ({prospect.get('company') or ''})"
            task = {
                "enrollment_id": row.id,
                "prospect_id": prospect["id"],
                "owner": seq.owner,
                "channel": step.channel.value,
                "action": step.action,
                "title": title,
                "body": outbound.body,
                "status": "open",
                "due_at": self.now,
                "created_at": self.now,
            }
            self.events.append(_raw_event(values, EventKind.queued, self.now, dedupe=f"touch:{key}:queued"))
            self.move(row.id, nxt, prospect, seq)
        self.new_touches.append((values, None if manual else outbound, task))

    # Outcomes -----------------------------------------------------------------
    def move(self, enrollment_id: int, nxt: Step | None, prospect: Mapping[str, Any], seq: Sequence) -> None:
        if nxt is None:
            return self.finish(enrollment_id, "completed")
        self.enrollment_updates.append(
            {"e_id": enrollment_id, "step": nxt.id, "due": due_at(seq, nxt, prospect, self.ws.config, self.now), "now": self.now}
        )

    def reschedule(self, enrollment_id: int, due: datetime) -> None:
        self.enrollment_updates.append({"e_id": enrollment_id, "step": None, "due": due, "now": self.now, "keep_step": True})

    def skip(self, row: Any, seq: Sequence, step: Step, prospect: Mapping[str, Any], reason: str) -> None:
        self.summary.skipped += 1
        values = {
            **TOUCH_DEFAULTS,
            "enrollment_id": row.id, "prospect_id": prospect["id"], "sequence": seq.name, "step_id": step.id,
            "channel": step.channel.value, "action": step.action, "idempotency_key": f"{row.id}:{step.id}",
            "status": "skipped", "spec_version": seq.version, "error": reason, "attempts": 0, "created_at": self.now,
        }
        self.new_touches.append((values, None, None))
        self.move(row.id, following(seq, step.id), prospect, seq)

    def pause(self, enrollment_id: int, reason: str) -> None:
        self.summary.paused += 1
        self.pauses.append({"e_id": enrollment_id, "reason": reason, "now": self.now})

    def finish(self, enrollment_id: int, kind: str, reason: str | None = None) -> None:
        if kind == "completed":
            self.summary.completed += 1
        else:
            self.summary.exited += 1
        self.finished[kind if reason is None else f"{kind}\x00{reason}"].append(enrollment_id)

    # Writes -------------------------------------------------------------------
    def flush(self) -> None:
        conn = self.conn
        # Grouped by channel: each channel's touches then share pages, and a channel's delivery
        # rewrites its own pages, not every page of the batch (18 % less WAL on SQLite at 10k).
        fresh = sorted(((v, o, t) for v, o, t in self.new_touches if "id" not in v), key=lambda f: f[0]["channel"])
        again = [v for v, _, _ in self.new_touches if "id" in v]
        if fresh:
            at = datetime_param(conn.dialect)  # every row holds every column: touch() and skip() see to it
            INSERT_TOUCHES.run(conn, [(*_touch_fields(v), at(v["created_at"]), at(v["sent_at"])) for v, _, _ in fresh])
            keys = [v["idempotency_key"] for v, _, _ in fresh]
            ids = dict(conn.execute(select(touches.c.idempotency_key, touches.c.id).where(among(conn, touches.c.idempotency_key, keys))).all())
            for values, outbound, task in fresh:
                touch_id = values["id"] = ids[values["idempotency_key"]]
                if outbound is not None:
                    outbound.touch_id = touch_id
                if task is not None:
                    task["touch_id"] = touch_id
        if again:  # a retried step reuses its touch row: the idempotency key stays the same
            columns = ("status", "error", "subject", "content_hash", "message_id", "lease_owner", "spec_version", "variant", "sender", "recipient")
            conn.execute(
                update(touches).where(touches.c.id == bindparam("t_id")).values({c: bindparam(f"v_{c}") for c in columns}),
                [{"t_id": v["id"], **{f"v_{c}": v.get(c) for c in columns}} for v in again],
            )
        task_rows = [t for _, _, t in self.new_touches if t is not None]
        if task_rows:
            conn.execute(insert(tasks), task_rows)
        touch_ids = {v["idempotency_key"]: v["id"] for v, _, _ in self.new_touches}
        for ev in self.events:
            ev["touch_id"] = touch_ids.get(ev["_key"])
        if self.events:
            conn.execute(insert(events), [{k: v for k, v in ev.items() if k != "_key"} for ev in self.events])
        moves = [u for u in self.enrollment_updates if not u.get("keep_step")]
        waits = [u for u in self.enrollment_updates if u.get("keep_step")]
        release = {"lease_owner": None, "lease_expires_at": None, "updated_at": bindparam("now")}
        if moves:
            conn.execute(
                update(enrollments).where(enrollments.c.id == bindparam("e_id")).values(next_step_id=bindparam("step"), next_due_at=bindparam("due"), **release),
                moves,
            )
        if waits:
            conn.execute(update(enrollments).where(enrollments.c.id == bindparam("e_id")).values(next_due_at=bindparam("due"), **release), waits)
        if self.pauses:
            _pause(conn, self.pauses)
        for key, ids in self.finished.items():
            kind, _, reason = key.partition("\x00")
            finish_enrollments(conn, self.ws, ids, kind, reason or kind, self.now)
        self.capacity.counted(conn)
        for values, outbound, _ in self.new_touches:
            if outbound is not None:
                self.batch.outbound.setdefault(outbound.channel, []).append(outbound)


class _Capacity:
    """Rolling-window counts per sender identity, kept in memory between batches and exact
    across workers.

    A batch first holds its senders (`hold`): their rows of `sender_locks`, locked until the
    batch's touches are committed (FOR UPDATE on PostgreSQL; SQLite has one writer, taken
    by the update), so no other worker writes a touch from them meanwhile. Holding, it
    counts what it does not know yet: a sender's whole week the first time, then only the
    touches others wrote since (ids above the last one it saw while holding that sender: a
    later touch from that sender can only be written, and its id drawn, after the lock is
    released). Its own takes are counted in memory as it decides (`take`), and `counted`
    moves the marks past its own touches once they are written."""

    def __init__(self, ws: Workspace, now: datetime):
        self.ws, self.now = ws, now
        self.counts: Counter[tuple[str, str, str, str]] = Counter()
        # Emails per mailbox and recipient domain over the last day: a burst to one company's
        # mail server is what gets a sending domain blocked.
        self.domain_cap = ws.config.limits.email_per_recipient_domain_per_day
        self.by_domain: Counter[tuple[str, str]] = Counter()
        self.today = now.astimezone(zone_for(None, ws.config.timezone)).date()
        self._budgets: dict[tuple[str, Channel, str], tuple[tuple[Any, ...], tuple[tuple[Any, int], ...]]] = {}
        self.seen_up_to: dict[str, int] = {}  # sender -> the last touch id counted for it while held
        self.held: tuple[str, ...] = ()

    def hold(self, conn: Any, senders: set[str], owner: str) -> None:
        self.held = tuple(sorted(senders))
        if not self.held:
            return
        known = set(conn.scalars(select(sender_locks.c.sender).where(sender_locks.c.sender.in_(self.held))))
        if new := [{"sender": sender} for sender in self.held if sender not in known]:  # in one order for every worker
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            conn.execute(dialect.insert(sender_locks).on_conflict_do_nothing(index_elements=["sender"]), new)
        conn.execute(select(sender_locks.c.sender).where(sender_locks.c.sender.in_(self.held)).order_by(sender_locks.c.sender).with_for_update())
        conn.execute(update(sender_locks).where(sender_locks.c.sender.in_(self.held)).values(held_by=owner, held_at=self.now))
        top = conn.scalar(select(func.max(touches.c.id))) or 0
        by_mark: dict[int, list[str]] = defaultdict(list)
        for sender in self.held:
            by_mark[self.seen_up_to.get(sender, -1)].append(sender)
        for mark, group in by_mark.items():
            if mark < 0:
                self._count_week(conn, group)
            else:
                self._count_since(conn, set(group), mark)
        self.seen_up_to.update(dict.fromkeys(self.held, top))

    def counted(self, conn: Any) -> None:
        """The batch's own touches are written (and were counted by `take`)."""
        if self.held:
            self.seen_up_to.update(dict.fromkeys(self.held, conn.scalar(select(func.max(touches.c.id))) or 0))

    def _windows(self) -> tuple[datetime, datetime, datetime]:
        return self.now - timedelta(hours=1), self.now - timedelta(days=1), self.now - timedelta(days=7)

    def _count_week(self, conn: Any, senders: list[str]) -> None:
        """The senders' week, counted in SQL (grouped on their index, not row by row)."""
        hour, day, week = self._windows()
        theirs = (touches.c.sender.in_(senders), touches.c.status.in_(COUNTED_STATUSES))
        rows = conn.execute(
            select(
                touches.c.sender,
                touches.c.channel,
                touches.c.action,
                func.sum(_case(touches.c.created_at >= hour)).label("h"),
                func.sum(_case(touches.c.created_at >= day)).label("d"),
                func.count().label("w"),
            )
            .where(touches.c.created_at >= week, *theirs)
            .group_by(touches.c.sender, touches.c.channel, touches.c.action)
        )
        for r in rows:
            for period, value in (("hour", r.h), ("day", r.d), ("week", r.w)):
                self.counts[(r.sender, r.channel, r.action, period)] += int(value or 0)
        if self.domain_cap is not None:
            domain = _domain_of(conn, touches.c.recipient)
            for sender, dom, n in conn.execute(
                select(touches.c.sender, domain, func.count())
                .where(touches.c.created_at >= day, touches.c.channel == "email", *theirs)
                .group_by(touches.c.sender, domain)
            ):
                self.by_domain[(sender, (dom or "").lower())] += int(n)

    def _count_since(self, conn: Any, senders: set[str], after_id: int) -> None:
        """The senders' touches written by others since `after_id`: a range of the primary key
        (a handful of rows, none when this worker is alone), counted here."""
        hour, day, week = self._windows()
        for sender, channel, action, created_at, recipient in conn.execute(
            select(touches.c.sender, touches.c.channel, touches.c.action, touches.c.created_at, touches.c.recipient)
            .where(touches.c.id > after_id, touches.c.status.in_(COUNTED_STATUSES))
        ):
            if sender not in senders or created_at < week:
                continue
            for period, start in (("hour", hour), ("day", day), ("week", week)):
                if created_at >= start:
                    self.counts[(sender, channel, action, period)] += 1
            if self.domain_cap is not None and channel == "email" and created_at >= day and recipient:
                self.by_domain[(sender, recipient.rpartition("@")[2].lower())] += 1

    def budget(self, sender: str, step: Step) -> tuple[tuple[Any, ...], tuple[tuple[Any, int], ...]]:
        """The counters a send from `sender` on this step adds to, and (counter, limit) for the
        ones that are capped; built once per sender and step kind, not per touch."""
        key = (sender, step.channel, step.action)
        found = self._budgets.get(key)
        if found is None:
            counters = {p: (sender, step.channel.value, step.action, p) for p in ("hour", "day", "week")}
            capped = tuple((counters[p], limit) for p, limit in self._read_limits(sender, step).items())
            found = self._budgets[key] = (tuple(counters.values()), capped)
        return found

    def _read_limits(self, sender: str, step: Step) -> dict[str, int]:
        cfg = self.ws.config
        if step.channel == Channel.email:
            box = cfg.mailbox(sender)
            if box is None:
                return {}
            out = {"day": box.warmup.daily_cap(self.today, box.daily_limit) if box.warmup else box.daily_limit}
            if box.hourly_limit:
                out["hour"] = box.hourly_limit
            return out
        if step.channel == Channel.linkedin:
            out = {}
            if step.action in cfg.limits.linkedin_per_day:
                out["day"] = cfg.limits.linkedin_per_day[step.action]
            if step.action == "invite":
                out["week"] = cfg.limits.linkedin_invites_per_week
            return out
        if step.channel == Channel.call:
            return {"day": cfg.limits.calls_per_day}
        return {}

    def take(self, sender: str, step: Step, recipient: str) -> bool:
        counters, capped = self.budget(sender, step)
        counts = self.counts
        for counter, limit in capped:
            if counts[counter] >= limit:
                return False
        domain_key = None
        if self.domain_cap is not None and step.channel == Channel.email:
            domain_key = (sender, recipient.rpartition("@")[2].lower())
            if self.by_domain[domain_key] >= self.domain_cap:
                return False
        for counter in counters:
            counts[counter] += 1
        if domain_key is not None:
            self.by_domain[domain_key] += 1
        return True

    def retry_at(self, step: Step) -> datetime:
        return self.now + (timedelta(hours=1) if step.channel == Channel.email else timedelta(hours=4))


def _domain_of(conn: Any, address: Any) -> Any:
    """The part after the @, in SQL (grouped in the database, not row by row in Python)."""
    if conn.dialect.name == "postgresql":
        return func.split_part(address, "@", 2)
    return func.substr(address, func.instr(address, "@") + 1)


def _case(condition: Any) -> Any:
    return case((condition, 1), else_=0)


def _recipient(step: Step, prospect: Mapping[str, Any]) -> str | None:
    if step.channel == Channel.email:
        return prospect.get("email")
    if step.channel == Channel.linkedin:
        return prospect.get("linkedin_url")
    if step.channel == Channel.call:
        return prospect.get("phone")
    return prospect.get("email") or prospect.get("linkedin_url") or prospect.get("phone") or f"prospect {prospect['id']}"


def _thread(step: Step, history: list[Any]) -> Any:
    if not (step.email and step.email.reply_to):
        return None
    return next((t for t in history if t.step_id == step.email.reply_to and t.status == "sent" and t.message_id), None)


def _raw_event(values: Mapping[str, Any], kind: EventKind, now: datetime, *, dedupe: str, detail: str | None = None) -> dict[str, Any]:
    return {
        "_key": values["idempotency_key"],
        "occurred_at": now,
        "recorded_at": now,
        "kind": kind.value,
        "channel": values["channel"],
        "detail": detail,
        "prospect_id": values["prospect_id"],
        "enrollment_id": values["enrollment_id"],
        "touch_id": None,
        "sequence": values["sequence"],
        "step_id": values["step_id"],
        "variant": values.get("variant"),
        "sender": values.get("sender"),
        "payload": {},
        "dedupe_key": dedupe,
    }

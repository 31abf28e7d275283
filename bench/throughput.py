"""Benchmark 1: dispatch throughput, through the real `dispatch` flow and through
Dispatcher.run, against the floor and the naive design measured in the same run."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import insert, select

from bench.child import run_child
from bench.common import (
    DEFAULT_BATCH,
    NOW,
    PG_URL,
    checkpoint,
    copy_sqlite,
    fresh_store,
    seed,
    timed,
    wait_until_idle,
    wait_until_recorded,
    write_workspace,
)
from bench.results import Check, Section
from connectors.sandbox import provider_message_id
from relance.dispatch import fewer_collections
from relance.email_message import make_message_id
from relance.enrollment import PROSPECT_COLUMNS
from relance.planning import pick_variant
from relance.rendering import Rendered, Renderer, one_line
from relance.store import Store, enrollments, prospects, touches
from relance.tokens import UnsubscribeTokens, workspace_secret
from relance.workspace import Workspace

T = TypeVar("T")


@dataclass
class Row:
    backend: str
    n: int
    mode: str
    seconds: float
    touches: int
    peak_rss: int | None = None
    cpu_seconds: float | None = None  # of the measuring process (the Prefect server's is not in it)

    @property
    def rate(self) -> float:
        return self.touches / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------- the baselines


def touch_work(url: str, root: Path, limit: int | None = None) -> list[tuple[tuple[Any, Any], dict[str, Any], dict[str, Any]]]:
    """Per due enrollment: (compiled subject and body templates, render context, touch row).

    Built before any clock starts: the floor and the naive design are charged only for
    rendering and writing, what every design must do.
    """
    ws = Workspace.load(root)
    renderer = Renderer(ws.templates_dir)  # the same sandboxed Jinja2 environment as dispatch
    seq = ws.sequences["outbound"]
    company = ws.config.company.model_dump()
    base = ws.config.web.base_url.rstrip("/")
    tokens = UnsubscribeTokens(workspace_secret(ws.root, ws.config.web.secret_env))
    senders = {b.email: {"name": b.name, "email": b.email, "signature": b.signature} for boxes in ws.config.senders.values() for b in boxes}
    seq_ctx = {"name": seq.name, "description": seq.description, "owner": seq.owner, "language": seq.language, "kind": seq.kind}
    compiled: dict[tuple[str, str | None], tuple[Any, Any]] = {}
    for step in seq.steps:
        if step.email:
            _, body = renderer._compiled(step.email.template)
            subjects = [v.subject for v in step.email.variants] or [None]
            for subject in subjects:
                own = renderer._compiled(step.email.template)[0]
                compiled[(step.id, subject)] = (renderer.env.from_string(subject) if subject else own, body)
        else:
            name = step.linkedin.template if step.linkedin else step.call.script
            compiled[(step.id, None)] = renderer._compiled(name)
    store = Store(url, migrate=False)
    stmt = (
        select(enrollments.c.id, enrollments.c.next_step_id, enrollments.c.sender, *[c.label(f"p_{c.name}") for c in PROSPECT_COLUMNS])
        .join(prospects, prospects.c.id == enrollments.c.prospect_id)
        .where(enrollments.c.state == "active", enrollments.c.next_due_at <= NOW)
        .order_by(enrollments.c.id)
    )
    if limit:
        stmt = stmt.limit(limit)
    with store.connect() as conn:
        rows = conn.execute(stmt).all()
    store.dispose()
    work = []
    for r in rows:
        p = {c.name: getattr(r, f"p_{c.name}") for c in PROSPECT_COLUMNS}
        step = seq.step(r.next_step_id)
        variant = pick_variant(step.email.variants, seq.name, step.id, p["id"]) if step.email else None
        sender = senders[r.sender] if step.email else senders[seq.owner]
        key = f"{r.id}:{step.id}"
        ctx = {
            "prospect": p,
            "sender": sender,
            "company": company,
            "unsubscribe_url": f"{base}/u/{tokens.make(p['id'], r.id)}",
            "sequence": seq_ctx,
            "step": {"id": step.id, "channel": step.channel.value, "action": step.action},
        }
        recipient = p["email"] if step.email else (p["linkedin_url"] if step.linkedin else p["phone"])
        row = {
            "enrollment_id": r.id, "prospect_id": p["id"], "sequence": seq.name, "step_id": step.id,
            "channel": step.channel.value, "action": step.action, "idempotency_key": key, "status": "sent",
            "spec_version": seq.version, "variant": variant.id if variant else None, "sender": sender["email"],
            "recipient": recipient, "subject": None, "content_hash": None,
            "message_id": make_message_id(sender["email"], key) if step.email else None,
            "provider_message_id": provider_message_id(key),
            "attempts": 1, "error": None, "lease_owner": None, "created_at": NOW, "sent_at": NOW,
        }  # fmt: skip
        work.append((compiled[(step.id, variant.subject if variant else None)], ctx, row))
    return work


# What a touch row holds once sent, whoever wrote it (its id and lease aside).
ROW_COLUMNS = (
    "enrollment_id", "prospect_id", "sequence", "step_id", "channel", "action", "idempotency_key", "status",
    "spec_version", "variant", "sender", "recipient", "subject", "content_hash", "message_id", "provider_message_id",
    "attempts", "error", "created_at", "sent_at",
)  # fmt: skip


def touch_rows_digest(url: str) -> str:
    """A digest of every touch row: the floor must have written the very rows dispatch did."""
    store = Store(url, migrate=False)
    digest = hashlib.sha256()
    with store.connect() as conn:
        stmt = select(*(touches.c[name] for name in ROW_COLUMNS)).order_by(touches.c.idempotency_key)
        for row in conn.execute(stmt):
            digest.update(repr(tuple(row)).encode())
    store.dispose()
    return digest.hexdigest()


def floor(url: str, work: list[Any], batch: int) -> tuple[float, float]:
    """Render and insert the touch rows with plain SQLAlchemy Core executemany, nothing else;
    timed until the store is closed, as the flow is (SQLite checkpoints its WAL on that close).

    Under the garbage-collector setting dispatch runs with (`fewer_collections`): with the
    default one, every other floor paid for a full collection of the bench's own heap (Prefect,
    the prepared work) and took twice as long."""
    store = Store(url, migrate=False)
    with store.connect():
        pass
    with fewer_collections(), timed() as t:
        for start in range(0, len(work), batch):
            rows = []
            for (subject_tpl, body_tpl), ctx, row in work[start : start + batch]:
                subject = one_line(subject_tpl.render(ctx)) if subject_tpl is not None else None
                body = body_tpl.render(ctx).strip("\n") + "\n"
                rows.append({**row, "subject": subject, "content_hash": Rendered(subject, body).content_hash})
            with store.begin() as conn:
                conn.execute(insert(touches), rows)
        store.dispose()
    return t.seconds, t.cpu


# ---------------------------------------------------------------------------- the benchmark


class Throughput:
    """Each size is measured in `rounds` interleaved rounds (floor, run, flow, floor, run,
    flow, ...) and each mode's median round is the one reported: the speed of this shared
    machine drifts by half from one minute to the next, which a single round per mode
    charged to whichever mode ran in the slow minute."""

    def __init__(self, work: Path, *, sizes: dict[str, list[int]], naive_sample: int, batch: int = DEFAULT_BATCH, rounds: int = 3):
        self.work = work
        self.sizes = sizes  # backend -> enrollment counts
        self.naive_sample = naive_sample
        self.batch = batch
        self.rounds = rounds
        self.rows: list[Row] = []  # every round's
        self.errors: list[str] = []  # retries and server delays: noted, the figures still stand
        self.invalid: list[str] = []  # what makes a figure meaningless: a failed round, missing or different rows
        self.digests: dict[tuple[str, int], dict[str, set[str]]] = {}  # (backend, n) -> mode -> touch rows digests

    # A store seeded with n due enrollments, as a URL ready for one measurement.
    def _seeded(self, backend: str, n: int, label: str) -> str:
        if backend == "postgresql":
            store = fresh_store("postgresql", self.work, label)
            seed(store, n)
            store.dispose()
            return PG_URL
        template = self.work / f"seed-{n}.db"
        if not template.exists():
            store = fresh_store("sqlite", self.work, f"seed-{n}")
            seed(store, n)
            checkpoint(store)
        return copy_sqlite(template, self.work / f"{label}.db")

    def _root(self, label: str, url: str) -> Path:
        return write_workspace(self.work / f"ws-{label}", url, batch=self.batch)

    def warm_up(self) -> float:
        """The first flow call starts Prefect's temporary server: not charged to any run."""
        from flows._common import call_flow
        from flows.dispatch import dispatch

        url = self._seeded("sqlite", 200, "warmup")
        root = self._root("warmup", url)
        with timed() as t:
            call_flow(dispatch, workspace=str(root), now=NOW)
        return t.seconds

    def _attempt(self, what: str, fn: Any) -> None:
        """One measurement; a failure (say, the temporary Prefect server killed under us) is
        recorded and the others still run."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self.invalid.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
            print(f"   {what} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)

    def measure_naive(self, backend: str) -> None:
        for _ in range(self.rounds):
            self._attempt(f"{backend} naive", lambda: self._naive(backend))

    def _naive(self, backend: str) -> None:
        from bench import naive

        n = self.naive_sample
        label = f"naive-{backend}"

        def once() -> tuple[float, str, int]:
            url = self._seeded(backend, n, label)
            work = touch_work(url, self._root(label, url))
            store = Store(url, migrate=False)
            try:
                return *naive.run(store.engine, work, self.work / f"{label}.jsonl"), len(work)  # loop time, inside the flow
            finally:
                store.dispose()

        seconds, flow_run_id, touched = self._with_retries(f"{backend} naive", once)
        self._settle_server(flow_run_id, touched)
        self.rows.append(Row(backend, n, "naive", seconds, touched))

    def measure(self, backend: str, n: int) -> None:
        for _ in range(self.rounds):
            self._attempt(f"{backend} {n:,} floor", lambda: self._floor(backend, n))
            self._attempt(f"{backend} {n:,} Dispatcher.run", lambda: self._run(backend, n))
            self._attempt(f"{backend} {n:,} dispatch flow", lambda: self._flow(backend, n))
        if backend == "sqlite":
            for label in (f"floor-{backend}-{n}", f"run-{backend}-{n}", f"flow-{backend}-{n}"):
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.work / label}.db{suffix}").unlink(missing_ok=True)

    def _floor(self, backend: str, n: int) -> None:
        label = f"floor-{backend}-{n}"
        url = self._seeded(backend, n, label)
        work = touch_work(url, self._root(label, url))
        seconds, cpu = floor(url, work, self.batch)
        self.rows.append(Row(backend, n, "floor", seconds, len(work), cpu_seconds=cpu))
        self._digest(backend, n, "floor", url)

    def _run(self, backend: str, n: int) -> None:
        """Dispatcher.run, in a child process: its peak RSS is its own."""
        label = f"run-{backend}-{n}"
        url = self._seeded(backend, n, label)
        result = run_child(self._root(label, url), (backend, n))
        self._check_summary(backend, n, "run", result["summary"])
        sent = sum(result["summary"]["sent"].values())
        self.rows.append(Row(backend, n, "Dispatcher.run", result["seconds"], sent, result["peak_rss"], result["cpu_seconds"]))
        self._digest(backend, n, "Dispatcher.run", url)

    def _flow(self, backend: str, n: int) -> None:
        from flows._common import call_flow
        from flows.dispatch import dispatch

        label = f"flow-{backend}-{n}"

        def once() -> tuple[dict[str, Any], Any, str, str]:
            url = self._seeded(backend, n, label)
            root = self._root(label, url)
            with timed() as t:
                state = call_flow(dispatch, workspace=str(root), now=NOW, return_state=True)
            return state.result(), t, url, str(state.state_details.flow_run_id)

        summary, t, url, flow_run_id = self._with_retries(f"{backend} {n:,} dispatch flow", once)
        # One prepare task per batch, one send task per batch and channel (every batch of this
        # workload holds all three channels): the next measurement waits until they are recorded.
        self._settle_server(flow_run_id, -(-summary["claimed"] // self.batch) * (1 + len(summary["sent"])))
        self._check_summary(backend, n, "flow", summary)
        self.rows.append(Row(backend, n, "dispatch flow", t.seconds, sum(summary["sent"].values()), cpu_seconds=t.cpu))
        self._digest(backend, n, "dispatch flow", url)

    def _settle_server(self, flow_run_id: str, tasks: int) -> None:
        if (recorded := wait_until_recorded(flow_run_id, tasks)) < tasks:
            self.errors.append(f"Prefect's server had recorded {recorded} of the {tasks} task runs of flow run {flow_run_id} after 300 s")
        if not wait_until_idle():
            self.errors.append(f"Prefect's server was still busy 60 s after flow run {flow_run_id}'s task runs were recorded")

    def _digest(self, backend: str, n: int, mode: str, url: str) -> None:
        self.digests.setdefault((backend, n), {}).setdefault(mode, set()).add(touch_rows_digest(url))

    def medians(self) -> list[Row]:
        """Per (backend, size, mode), the round with the median time (the upper one of an even count)."""
        groups: dict[tuple[str, int, str], list[Row]] = {}
        for r in self.rows:
            groups.setdefault((r.backend, r.n, r.mode), []).append(r)
        return [sorted(rows, key=lambda r: r.seconds)[len(rows) // 2] for rows in groups.values()]

    def spread(self, row: Row) -> str:
        times = sorted(r.seconds for r in self.rows if (r.backend, r.n, r.mode) == (row.backend, row.n, row.mode))
        return " / ".join(f"{t:.2f}" for t in times)

    def _with_retries(self, what: str, once: Callable[[], T]) -> T:
        """`once` up to three times: Prefect's temporary server, still recording earlier runs'
        thousands of task runs, can answer 503 "database is locked" before a flow run exists.
        `once` seeds its own store, so each attempt starts from the seeded state."""
        for attempt in (1, 2):
            try:
                return once()
            except Exception as exc:
                self.errors.append(f"{what}, attempt {attempt}: {type(exc).__name__}: {str(exc)[:200]} (retried)")
                time.sleep(20)
        return once()

    def _check_summary(self, backend: str, n: int, mode: str, summary: dict[str, Any]) -> None:
        sent = sum(summary["sent"].values())
        if summary["claimed"] != n or sent != n:
            self.invalid.append(f"{backend} {n} {mode}: claimed {summary['claimed']}, sent {sent} of {n} ({summary})")

    # ------------------------------------------------------------------------ report
    def section(self) -> Section:
        s = Section("1. throughput", "1. Dispatch throughput (multichannel cadence, sandbox connectors, email_record: jsonl)")
        s.notes = [
            f"Everyone due at once at {NOW:%Y-%m-%d %H:%M} UTC (a Tuesday, inside the window); enrollments spread over the"
            " five steps (email intro with A/B subjects, LinkedIn invite, call, email follow-up with a `when`, LinkedIn message),"
            f" so one run sends 40 % email, 40 % LinkedIn, 20 % call. batch_size {self.batch} (the default of config.yaml); capacity limits set out of reach.",
            "- **floor**: the same templates rendered with the same sandboxed Jinja2 environment (compiled once) and the same"
            " touch rows inserted with SQLAlchemy Core executemany per batch; nothing else. It runs under the"
            " garbage-collector setting dispatch runs with (`fewer_collections`): with the default one, every other floor"
            " paid for a full collection of the bench's own heap and took twice as long.",
            "- **Dispatcher.run**: claim/prepare/deliver/record without Prefect, in a fresh child process (peak RSS is its own).",
            "- **dispatch flow**: `flows.dispatch.dispatch` end to end, called as `relance serve` calls it (`call_flow`, whose Prefect"
            " API clients share one TLS context per process), with workspace load, reconcile, progress artifact, one task per"
            " batch and channel, against Prefect's temporary server started once per process (warm-up not counted).",
            f"- **naive**: one Prefect task per touch (render, insert its own row, append to a file), sample of {self.naive_sample}"
            " touches, loop time only; extrapolated as touches/s. Its tasks log as dispatch's do (no routine"
            " \"Finished in state Completed()\" lines).",
            "The floor and Dispatcher.run are timed until their store is closed, as the flow is: SQLite copies its WAL into"
            " the database file on that last close, a cost every design pays.",
            f"Each size is measured in {self.rounds} interleaved rounds (floor, Dispatcher.run, flow, then again), the naive"
            f" design in {self.rounds} rounds after all of them; the table shows each mode's median round, and **all rounds** its"
            " times from fastest to slowest. Every run's summary is checked: all enrollments claimed and every touch sent."
            " After each flow (and naive) run the bench waits until the server has recorded its task runs and gone idle: a"
            " run started while it still writes their events meets its SQLite database locked (503, then two seconds of"
            " client back-off) and shares the CPU with it.",
            "**CPU s** is the measuring process's CPU time (for the flow, not the Prefect server's): on a shared machine the"
            " wall-clock ratios move with other people's load, the CPU ratios much less.",
        ]
        invalid = self.invalid + [
            f"{backend} {n:,}: the touch rows differ between rounds or modes ({', '.join(sorted(digests))})"
            for (backend, n), digests in sorted(self.digests.items())
            if len(set().union(*digests.values())) > 1
        ]
        same = [f"{b} {n:,}" for (b, n), d in sorted(self.digests.items()) if len(d) == 3 and len(set().union(*d.values())) == 1]
        if same:
            s.notes.append(f"The floor, Dispatcher.run and the flow left the very same touch rows (a digest of every column but the id and lease, compared): {', '.join(same)}.")
        if self.errors:
            s.notes.append("**Retries and delays:** " + "; ".join(self.errors))
        # A ratio means something only if every round did the whole job, and the same one.
        s.checks.append(Check(
            "every round claimed and sent every enrollment; the floor, Dispatcher.run and the flow wrote the same touch rows",
            "; ".join(invalid) if invalid else f"{len(self.rows)} timed runs, all complete; {len(self.digests)} sizes compared",
            not invalid,
        ))  # fmt: skip
        s.headers = [
            "backend", "enrollments", "mode", "seconds", "touches", "touches/s", "x floor time", "x faster than naive",
            "CPU s", "x floor CPU", "peak RSS MB", "all rounds, s",
        ]  # fmt: skip
        medians = self.medians()
        floors = {(r.backend, r.n): r for r in medians if r.mode == "floor"}
        naive = {r.backend: r for r in medians if r.mode == "naive"}
        for r in medians:
            f = floors.get((r.backend, r.n))
            nv = naive.get(r.backend)
            s.rows.append([
                r.backend, r.n, r.mode, round(r.seconds, 2), r.touches, round(r.rate),
                f"{r.seconds / f.seconds:.2f}" if f and r.mode != "floor" and r.mode != "naive" else "",
                f"{r.rate / nv.rate:.1f}" if nv and r.mode not in ("naive", "floor") else "",
                f"{r.cpu_seconds:.2f}" if r.cpu_seconds is not None else "",
                f"{r.cpu_seconds / f.cpu_seconds:.2f}" if f and f.cpu_seconds and r.cpu_seconds is not None and r.mode not in ("floor", "naive") else "",
                f"{r.peak_rss / 2**20:.0f}" if r.peak_rss else "",
                self.spread(r),
            ])  # fmt: skip
        for r in medians:
            if r.mode != "dispatch flow":
                continue
            f, nv = floors.get((r.backend, r.n)), naive.get(r.backend)
            if r.backend == "sqlite":
                s.checks.append(Check(f"SQLite {r.n:,}: >= 5,000 touches/s end to end (flow)", f"{r.rate:,.0f} touches/s", r.rate >= 5000))
            if f:
                ratio = r.seconds / f.seconds
                s.checks.append(Check(f"{r.backend} {r.n:,}: flow <= 4x floor time", f"{ratio:.2f}x", ratio <= 4))
            if nv:
                speed = r.rate / nv.rate
                s.checks.append(Check(f"{r.backend} {r.n:,}: flow >= 30x faster than naive", f"{speed:.1f}x", speed >= 30))
        return s

"""Benchmark 2: a tick over 1,000 due enrollments costs the same with 10k and with 1M
enrollments in the store (the others not due: due in a year, or completed)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from bench.common import (
    NOW,
    PG_URL,
    count_due,
    fresh_store,
    seed,
    timed,
    write_workspace,
)
from bench.results import Check, Section
from relance.dispatch import Dispatcher
from relance.workspace import Workspace

DUE = 1_000
ROUNDS = 7  # timed, after one warm-up round


def _reset(ws: Workspace) -> None:
    """Back to the seeded state: the same 1,000 due again, no touches, no leases."""
    with ws.store.begin() as conn:
        conn.execute(text("DELETE FROM touches"))
        conn.execute(text("UPDATE enrollments SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner IS NOT NULL"))


def _capture_claim(ws: Workspace, dispatcher: Dispatcher) -> tuple[str, Any]:
    """The claim statement exactly as SQLAlchemy sends it, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def listener(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE ENROLLMENTS"):
            seen.append((statement, parameters))

    event.listen(ws.store.engine, "before_cursor_execute", listener)
    try:
        dispatcher.claim(NOW, limit=DUE)
    finally:
        event.remove(ws.store.engine, "before_cursor_execute", listener)
    return seen[0]


def _plan(ws: Workspace, statement: str, parameters: Any) -> str:
    if ws.store.is_postgres:
        with ws.store.engine.connect() as conn:
            trans = conn.begin()
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters).all()
            trans.rollback()  # EXPLAIN ANALYZE ran the UPDATE: undo it
        return "\n".join(r[0] for r in rows)
    with ws.store.engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
    depth: dict[int, int] = {0: -1}
    out = []
    for node, parent, _, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        out.append("  " * depth[node] + detail)
    return "\n".join(out)


class _Store:
    """One seeded store, ready for rounds of claim + prepare."""

    def __init__(self, work: Path, backend: str, total: int):
        self.backend, self.total = backend, total
        label = f"due-{backend}-{total}"
        store = fresh_store(backend, work, label)
        with timed() as t:
            seed(store, total, DUE)
        self.seed_s = t.seconds
        self.due = count_due(store)
        url = store.url if backend == "sqlite" else PG_URL
        store.dispose()
        self.label = label
        self.ws = Workspace.load(write_workspace(work / f"ws-{label}", url))
        self.dispatcher = Dispatcher(self.ws)
        self.statement, parameters = _capture_claim(self.ws, self.dispatcher)
        _reset(self.ws)
        self.plan = _plan(self.ws, self.statement, parameters)
        self.claims: list[float] = []
        self.totals: list[float] = []

    def round(self, timed_round: bool) -> None:
        with timed() as t_claim:
            ids = self.dispatcher.claim(NOW, limit=DUE)
        with timed() as t_prepare:
            batch = self.dispatcher.prepare(ids, NOW)
        if len(ids) != DUE or sum(len(v) for v in batch.outbound.values()) != DUE:
            raise RuntimeError(f"{self.label}: claimed {len(ids)}, prepared {sum(len(v) for v in batch.outbound.values())} of {DUE}")
        if timed_round:
            self.claims.append(t_claim.seconds)
            self.totals.append(t_claim.seconds + t_prepare.seconds)
        _reset(self.ws)

    def result(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "total": self.total, "due": self.due, "seed_s": self.seed_s, "plan": self.plan,
            "statement": self.statement, "claim": statistics.median(self.claims), "tick": statistics.median(self.totals),
            "tick_min": min(self.totals), "tick_max": max(self.totals),
        }  # fmt: skip


def measure(work: Path, backend: str, small: int, large: int, rounds: int = ROUNDS) -> list[dict[str, Any]]:
    """On SQLite, both stores' rounds interleaved (small, large, small, ...): a slow spell of
    the machine then weighs on both, not on whichever was being measured. PostgreSQL has one
    bench database, so there one store after the other."""
    groups = [[small], [large]] if backend == "postgresql" else [[small, large]]
    results = []
    for totals in groups:
        stores = [_Store(work, backend, total) for total in totals]
        try:
            for i in range(rounds + 1):
                for store in stores:
                    store.round(timed_round=i > 0)
            results += [store.result() for store in stores]
        finally:
            for store in stores:
                store.ws.close()
    return results


def run(work: Path, backends: list[str], small: int, large: int, rounds: int = ROUNDS) -> Section:
    work.mkdir(parents=True, exist_ok=True)
    s = Section("2. due query", f"2. Due-query scaling: claim + prepare of {DUE:,} due enrollments, {small:,} vs {large:,} in the store")
    s.notes = [
        f"Both stores hold exactly {DUE:,} due enrollments, spread evenly through the table; the other ones are active and"
        " due in a year, or completed. Seeded with INSERT ... SELECT (recursive CTE on SQLite, generate_series on"
        f" PostgreSQL). One warm-up round, then {rounds} timed rounds of `Dispatcher.claim(limit=1000)` +"
        " `Dispatcher.prepare`, the store reset to the same state between rounds (on SQLite the two stores' rounds"
        " interleaved, so a slow spell of the machine weighs on both); medians compared. SQLite is not"
        " ANALYZEd (a real store never is); PostgreSQL is VACUUM ANALYZEd after the load, as autovacuum would, and checkpointed.",
        "The claim's own time is shown apart: finding the due rows is an index range scan (plans below); what it"
        " costs beyond that is writing the 1,000 leases back, one table page per row once the due rows are spread over"
        " a large table, so it grows from 10k to ~100k enrollments and then stays flat.",
    ]
    s.headers = ["backend", "enrollments", "due", "seed s", "claim ms (median)", "claim + prepare ms (median)", "min-max ms", "ratio to small"]
    plans = []
    for backend in backends:
        base = None
        for m in measure(work, backend, small, large, rounds):
            base = base or m
            ratio = m["tick"] / base["tick"]
            s.rows.append([
                backend, m["total"], m["due"], round(m["seed_s"], 1), round(m["claim"] * 1000, 1), round(m["tick"] * 1000, 1),
                f"{m['tick_min'] * 1000:.0f}-{m['tick_max'] * 1000:.0f}", f"{ratio:.2f}" if m is not base else "1.00",
            ])  # fmt: skip
            plans.append(f"**{backend}, {m['total']:,} enrollments**" + ("" if plans and backend in plans[-1] else f"\n\n```sql\n{m['statement'].strip()}\n```") + f"\n\n```\n{m['plan']}\n```")
            if m is not base:
                claim_ratio = m["claim"] / base["claim"]
                s.checks.append(Check(f"{backend}: tick over 1,000 due, {large:,} vs {small:,} enrollments: ratio <= 1.5", f"{ratio:.2f} (claim alone {claim_ratio:.2f})", ratio <= 1.5))
    s.extra = "### Claim query plans\n\n" + (
        "SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN (ANALYZE, BUFFERS) in a rolled-back transaction.\n\n"
    ) + "\n\n".join(plans)
    return s

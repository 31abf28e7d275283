"""Item 6 of issue 3: several dispatch workers, as separate processes, over the same
PostgreSQL store: zero duplicates, zero lost, two workers faster than one; and a worker
killed mid-run whose leased enrollments are taken over once its leases expire.

Each worker is `python -m bench.child` (Dispatcher.run: claim with FOR UPDATE SKIP LOCKED,
prepare, deliver, record) logging the idempotency key of every touch it hands to a
connector. Workers load their imports first and start together at a given wall-clock time,
so interpreter start-up is not in the figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.child import REPO
from bench.common import NOW, fresh_store, seed, write_workspace
from bench.results import Check, Section
from relance.store import Store

LEASE_SECONDS = 300  # the default dispatch.lease_seconds the bench workspace keeps


def _spawn(root: Path, start: float, log: Path, now: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.child", str(root), "--start", str(start), "--log-sends", str(log)]
    if now:
        cmd += ["--now", now]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _verify(store: Store, root: Path, logs: list[Path], n: int) -> dict[str, Any]:
    """What the store and the connectors saw: every due enrollment's touch sent once."""
    handed: Counter[str] = Counter()
    for log in logs:
        if log.exists():
            handed.update(line for line in log.read_text().splitlines() if line)
    delivered: Counter[str] = Counter()  # what the sandbox provider really sent, per key
    torn = 0  # lines a killed worker left unfinished (the sandbox writes a batch in one write(2): expect none)
    for outbox in (root / "outbox").glob("*.jsonl"):
        with outbox.open() as fh:
            for line in fh:
                try:
                    delivered[json.loads(line)["idempotency_key"]] += 1
                except ValueError:
                    torn += 1
    with store.connect() as conn:
        statuses = dict(conn.execute(text("SELECT status, count(*) FROM touches GROUP BY status")).all())
        keys = conn.scalar(text("SELECT count(DISTINCT idempotency_key) FROM touches"))
        attempts = conn.scalar(text("SELECT coalesce(sum(attempts), 0) FROM touches WHERE status = 'sent'"))
        performed = conn.scalar(text("SELECT count(*) FROM events WHERE dedupe_key LIKE :pattern"), {"pattern": "touch:%:performed"})
    return {
        "sent": statuses.get("sent", 0),
        "statuses": statuses,
        "distinct_keys": keys,
        "attempts": attempts,
        "performed_events": performed,
        "handed": sum(handed.values()),
        "handed_twice": sum(1 for c in handed.values() if c > 1),
        "delivered": sum(delivered.values()),
        "delivered_twice": sum(1 for c in delivered.values() if c > 1),
        "torn_lines": torn,
        "lost": n - statuses.get("sent", 0),
    }


def _run_workers(work: Path, n: int, workers: int, label: str) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    store = fresh_store("postgresql", work, label)
    seed(store, n)
    root = write_workspace(work / f"ws-{label}", str(store.engine.url.render_as_string(hide_password=False)))
    logs = [work / f"{label}-{i}.keys" for i in range(workers)]
    for log in logs:
        log.unlink(missing_ok=True)
    start = time.time() + 8.0  # after every worker's imports
    procs = [_spawn(root, start, log) for log in logs]
    results = [_result(p) for p in procs]
    wall = max(r["ended_at"] for r in results) - min(r["started_at"] for r in results)
    verdict = _verify(store, root, logs, n)
    store.dispose()
    return wall, results, verdict


def _kill_and_take_over(work: Path, n: int, expected_seconds: float) -> dict[str, Any]:
    """Two workers; one is killed -9 a third of the way in. The survivor finishes what it can;
    a worker started after the dead one's leases expired takes over the rest."""
    label = "scale-kill"
    store = fresh_store("postgresql", work, label)
    seed(store, n)
    root = write_workspace(work / f"ws-{label}", str(store.engine.url.render_as_string(hide_password=False)))
    logs = [work / f"{label}-{i}.keys" for i in range(3)]
    for log in logs:
        log.unlink(missing_ok=True)
    start = time.time() + 8.0
    survivor, victim = _spawn(root, start, logs[0]), _spawn(root, start, logs[1])
    time.sleep(max(0.0, start - time.time()) + expected_seconds / 3)
    # Killed mid-send: the moment its key log grows, the victim is handing a batch to a
    # connector, so it dies holding leases over touches written `sending`. (Killed at an
    # arbitrary instant, it may die between batches, holding nothing, and nothing is taken over.)
    logged = _size(logs[1])
    deadline = time.time() + 60
    while _size(logs[1]) == logged and victim.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    first = _result(survivor)
    # Leases run from when they were handed out: NOW plus the real time the dead worker had run.
    after_lease = (NOW + timedelta(seconds=LEASE_SECONDS + 1 + (time.time() - start))).isoformat()
    takeover = _result(_spawn(root, time.time(), logs[2], now=after_lease))
    verdict = _verify(store, root, logs, n)
    verdict["survivor_sent"] = sum(first["summary"]["sent"].values())
    verdict["takeover_sent"] = sum(takeover["summary"]["sent"].values())
    store.dispose()
    return verdict


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def run(work: Path, n: int) -> Section:
    work.mkdir(parents=True, exist_ok=True)
    s = Section("6. scale-out", f"6. Scale-out on PostgreSQL: 1 and 2 dispatch worker processes over {n:,} due enrollments")
    s.notes = [
        "Each worker is a separate `python -m bench.child` process running Dispatcher.run against the same PostgreSQL"
        " store (claims leased with FOR UPDATE SKIP LOCKED) and the same sandbox connectors; the workers import"
        " everything, then start together at an agreed wall-clock time; the time is from the first start to the last"
        " finish. Every key a worker hands to a connector is logged: *handed twice* counts keys handed more than once"
        " across all workers, *lost* counts due enrollments whose touch is not `sent`.",
        "Kill test: two workers, one killed with SIGKILL a third of the way through, as it next hands a batch to a"
        " connector (so it dies holding leases over touches written `sending`); the survivor runs to the end;"
        f" then a third worker runs at NOW + {LEASE_SECONDS + 1} s + the real time elapsed since the start (past the dead worker's {LEASE_SECONDS} s leases,"
        " which run from when they were handed out)"
        " and takes over what the dead one had claimed: its `sending` touches are resumed through the idempotent"
        " sandbox provider, which dedupes on the key.",
    ]
    s.headers = ["workers", "due", "seconds", "touches/s", "sent", "lost", "handed to a connector", "handed twice", "sent by the provider", "per-worker sent"]
    timings: dict[int, float] = {}
    for workers in (1, 2):
        wall, results, v = _run_workers(work, n, workers, f"scale-{workers}")
        timings[workers] = wall
        per_worker = " / ".join(f"{sum(r['summary']['sent'].values()):,}" for r in results)
        s.rows.append([workers, n, wall, v["sent"] / wall, v["sent"], v["lost"], v["handed"], v["handed_twice"], v["delivered"], per_worker])
        s.checks.append(Check(
            f"{workers} worker(s): zero duplicates, zero lost",
            f"lost {v['lost']}, handed twice {v['handed_twice']}, statuses {v['statuses']}",
            v["lost"] == 0 and v["handed_twice"] == 0 and v["handed"] == n and v["attempts"] == n and v["performed_events"] == n
            and v["delivered"] == n and v["delivered_twice"] == 0,
        ))
    speedup = timings[1] / timings[2]
    s.checks.append(Check("2 workers faster than 1 (2 cores)", f"{speedup:.2f}x ({timings[1]:.1f} s -> {timings[2]:.1f} s)", speedup > 1.0))
    k = _kill_and_take_over(work, n, timings[2])
    s.checks.append(Check(
        "worker killed -9 mid-run: the rest taken over after lease expiry, nothing lost, nothing sent twice",
        f"survivor {k['survivor_sent']:,}, take-over {k['takeover_sent']:,}, lost {k['lost']}; resent to the idempotent provider after"
        f" the crash {k['handed_twice']}, sent twice by it {k['delivered_twice']}, torn outbox lines {k['torn_lines']}; statuses {k['statuses']}",
        k["lost"] == 0 and k["delivered_twice"] == 0 and k["delivered"] == n and k["takeover_sent"] > 0 and k["torn_lines"] == 0,
    ))
    return s

"""Issue 3, item 8: a dispatcher killed with SIGKILL at random points of its batches.

The claim is that a crash never sends a touch twice and never loses one: what was in flight
when a worker died is resent through an idempotent provider (it drops the duplicate) and,
through a plain one, flagged `unknown` for a person instead of resent. Only real processes
dying mid-write can show it, so a real dispatcher process is killed, more than 20 times.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from typer.testing import CliRunner

from relance.cli import app
from relance.dispatch import Dispatcher
from relance.store import events, touches
from relance.workspace import Workspace
from tests.conftest import REPO, database_url
from tests.faults import (
    LEASE_SECONDS,
    START,
    enroll_many,
    enrollment_rows,
    eml_per_key,
    fault_workspace,
    iso,
    sandbox_table,
    touch_rows,
)

KILLS = 20
ENROLLMENTS = 550  # a killed run uses up at most its first batch (25): 20 kills leave work
LATENCY = 0.012  # seconds per touch at the provider: 0.15 s before and after it accepts a batch
# Where a kill is aimed: a random delay after the worker reports the phase (worker.py): while
# it reconciles or claims, while it prepares, while the provider has the batch but has not
# answered, and after the provider accepted it but before the outcome is recorded.
PHASES = ("running", "batch-1", "sending", "accepted")
PHASE_DELAY = {"running": 0.1, "batch-1": 0.3, "sending": 0.15, "accepted": 0.2}


class ForkServer:
    """Drives `python -m tests.faults.worker --serve`: starts dispatcher processes, kills them."""

    def __init__(self, root: Path, log: Path, pg_url: str | None):
        self.log = log
        self.stderr = log.open("w")
        self.pg = create_engine(pg_url) if pg_url else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.worker", "--serve", str(root)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._expect("ready", timeout=120)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def _expect(self, *prefixes: str, timeout: float) -> str:
        line = self.lines.get(timeout=timeout)
        if line == "eof" or not line.startswith(prefixes):
            pytest.fail(f"worker said {line!r}, expected {prefixes}; its stderr:\n{self.log.read_text()[-4000:]}")
        return line

    def run(self, now: datetime, owner: str, kill: tuple[str, float] | None = None, latency: float = LATENCY) -> tuple[int, str]:
        """Start one dispatcher; with `kill=(phase, delay)`, SIGKILL it `delay` seconds after it
        reaches `phase` of its first batch, or as it starts a second one. Returns its exit
        code (-9: killed) and the last phase it reported before it ended."""
        self.proc.stdin.write(f"run {iso(now)} {owner} {latency}\n")
        self.proc.stdin.flush()
        pid = int(self._expect("started", timeout=60).split()[1])
        phase, deadline = "started", None
        while True:
            timeout = 120.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = self._expect("running", "phase", "exited", timeout=timeout)
            except queue.Empty:
                break
            if line.startswith("exited"):
                return self._exit_code(line), phase
            phase = "running" if line.startswith("running") else line.split()[-1]
            if kill is not None and phase == kill[0]:
                deadline = time.monotonic() + kill[1]
            if kill is not None and phase == "batch-2":
                break  # never let a run get past its first batch: the work must last 20 kills
        os.kill(pid, signal.SIGKILL)
        while not (line := self._expect("running", "phase", "exited", timeout=30)).startswith("exited"):
            phase = "running" if line.startswith("running") else line.split()[-1]  # written before it died
        self._wait_for_postgres(pid)
        return self._exit_code(line), phase

    def _exit_code(self, line: str) -> int:
        code = int(line.split()[2])
        if code not in (0, -signal.SIGKILL):
            pytest.fail(f"dispatcher exited with {code}; its stderr:\n{self.log.read_text()[-4000:]}")
        return code

    def _wait_for_postgres(self, pid: int) -> None:
        """PostgreSQL rolls back a dead client's transaction when it notices the closed socket:
        look at the store only once the session is gone."""
        if self.pg is None:
            return
        deadline = time.monotonic() + 20
        with self.pg.connect() as conn:
            while conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"), {"a": f"relance-fault-{pid}"}):
                assert time.monotonic() < deadline, "PostgreSQL kept a killed worker's session"
                time.sleep(0.02)
                conn.rollback()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        if self.pg is not None:
            self.pg.dispose()


def kill_repeatedly(root: Path, ws: Workspace, tmp_path: Path, backend: str, seed: str) -> tuple[dict[int, int], Counter[str], datetime]:
    """Kill a dispatcher KILLS times, each at a random point of one phase of its first batch
    (every phase is aimed at equally often), moving the clock past the lease before each
    restart so the next worker reconciles the dead one's claims; then let one finish.
    Returns the touches found `sending` after each kill (touch id -> kill number), where the
    kills landed, and the final clock."""
    rng = random.Random(seed)
    targets = [PHASES[i % len(PHASES)] for i in range(KILLS)]
    rng.shuffle(targets)
    server = ForkServer(root, tmp_path / "worker.log", ws.database_url if backend == "postgres" else None)
    in_flight: dict[int, int] = {}
    landed: Counter[str] = Counter()
    now = START
    try:
        for kill, target in enumerate(targets, 1):
            code, phase = server.run(now, f"worker-{kill}", kill=(target, rng.uniform(0.0, PHASE_DELAY[target])))
            assert code == -signal.SIGKILL, f"run {kill} ended before its kill"
            landed[phase] += 1
            for t in touch_rows(ws, touches.c.status == "sending"):
                in_flight.setdefault(t.id, kill)
            now += timedelta(seconds=LEASE_SECONDS + 1)
        code, _ = server.run(now, "clean", latency=0.0)
        assert code == 0
    finally:
        server.close()
    return in_flight, landed, now


@pytest.fixture
def crash_ws(request, backend: str, tmp_path: Path):
    email = request.param
    root = fault_workspace(tmp_path / "ws", database_url(backend, tmp_path), email=email)
    ws = Workspace.load(root)
    enroll_many(ws, ENROLLMENTS)
    yield ws
    ws.close()


@pytest.mark.parametrize("crash_ws", ["sandbox"], indirect=True)
def test_idempotent_provider_sends_every_touch_exactly_once_across_kills(crash_ws: Workspace, backend: str, tmp_path: Path):
    """With a provider that dedupes on our key, a touch in flight at a crash is simply resent."""
    ws = crash_ws
    in_flight, landed, _ = kill_repeatedly(ws.root, ws, tmp_path, backend, seed=f"idempotent-{backend}")
    assert sum(landed.values()) == KILLS and landed["sending"] and landed["accepted"], landed
    assert in_flight, "no kill landed between the `sending` write and the recorded outcome"

    intro = touch_rows(ws, touches.c.step_id == "intro")
    keys = {t.idempotency_key for t in intro}
    assert len(intro) == ENROLLMENTS == len(keys)  # one touch per (enrollment, step)
    assert Counter(t.status for t in touch_rows(ws)) == {"sent": ENROLLMENTS}  # none sending, unknown or failed
    assert all(ws.config.dispatch.max_attempts > t.attempts >= 1 for t in intro)
    with ws.store.connect() as conn:
        performed = Counter(conn.scalars(select(events.c.touch_id).where(events.c.kind == "sent")))
    assert performed == {t.id: 1 for t in intro}
    # The provider's side: one accepted key and one .eml per touch, none for anything else.
    assert eml_per_key(ws) == {k: 1 for k in keys}
    assert set(sandbox_table(ws, "accepted")) == keys
    # None lost: every enrollment moved past its first step.
    states = Counter((e.state, e.next_step_id) for e in enrollment_rows(ws).values())
    assert states == {("active", "invite"): ENROLLMENTS}


@pytest.mark.parametrize("crash_ws", ["sandbox_plain"], indirect=True)
def test_plain_provider_never_resends_blindly_and_flags_unknown_touches(crash_ws: Workspace, backend: str, tmp_path: Path):
    """Without provider dedup a resend could be a duplicate email: in-flight touches are
    flagged `unknown`, their enrollments paused, and shown to a person by `relance status`."""
    ws = crash_ws
    in_flight, landed, now = kill_repeatedly(ws.root, ws, tmp_path, backend, seed=f"plain-{backend}")
    assert sum(landed.values()) == KILLS and landed["sending"] and landed["accepted"], landed
    assert in_flight, "no kill landed between the `sending` write and the recorded outcome"

    by_id = {t.id: t for t in touch_rows(ws)}
    emls = eml_per_key(ws)
    assert not list((ws.root / "outbox" / "email").glob("*~*.eml")), "a touch was sent twice"
    assert max(emls.values()) == 1
    assert not [t for t in by_id.values() if t.status == "sending"]

    unknown = {i for i, t in by_id.items() if t.status == "unknown"}
    assert unknown == set(in_flight)  # every touch in flight at a death, and only those
    enrolled = enrollment_rows(ws)
    for touch_id in unknown:
        t = by_id[touch_id]
        assert t.error == "worker died during send"
        e = enrolled[t.enrollment_id]
        assert e.state == "paused" and "unknown" in e.reason
    # Some of them had reached the provider: a blind resend would have doubled these emails.
    assert any(emls[by_id[i].idempotency_key] for i in unknown)

    # None lost: every other touch went out exactly once and its enrollment moved on.
    for t in by_id.values():
        if t.status != "unknown":
            assert t.status == "sent" and t.step_id == "intro" and emls[t.idempotency_key] == 1
            assert (enrolled[t.enrollment_id].state, enrolled[t.enrollment_id].next_step_id) == ("active", "invite")
    assert len(by_id) == len(enrolled) == ENROLLMENTS

    result = CliRunner().invoke(app, ["status", "-w", str(ws.root), "--at", iso(now)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"'unknown': {len(unknown)}" in out and f"'paused': {len(unknown)}" in out
    listed = out.split("Failed, retrying or unknown touches", 1)[1]
    rows = [line for line in listed.splitlines() if "worker died during send" in line]
    assert rows and len(rows) == min(20, len(unknown))  # status shows the 20 latest
    assert {int(line.split()[1]) for line in rows} <= unknown
    assert "Paused (need a person)" in out and "send outcome unknown after a crash" in out


def test_a_late_reconciler_leaves_a_taken_over_touch_alone(backend: str, tmp_path: Path):
    """Every dispatch run reconciles first, so after a crash several workers reconcile the same
    dead touch at once. One that read it `sending` just before another worker resumed it and
    began sending it again must not then release that live send to a third worker (with an
    idempotent provider the dead touch is resumed; with a plain one it is flagged, not resent)."""
    root = fault_workspace(tmp_path / "ws", database_url(backend, tmp_path))
    ws = Workspace.load(root)
    [enrollment_id] = enroll_many(ws, 1)
    dead = Dispatcher(ws, owner="dead")
    dead.prepare(dead.claim(START), START)  # ...and dies: its touch stays `sending`
    later = START + timedelta(seconds=LEASE_SECONDS + 1)

    fast_ws, slow_ws = Workspace.load(root), Workspace.load(root)
    try:
        fast, slow = Dispatcher(fast_ws, owner="fast"), Dispatcher(slow_ws, owner="slow")
        in_flight = []
        connector = slow_ws.connector

        def meanwhile(channel):  # reconcile looks the connector up between its read and its writes
            if not in_flight:
                fast.reconcile(later)
                in_flight.append(fast.prepare(fast.claim(later), later))
            return connector(channel)

        slow_ws.connector = meanwhile
        slow.reconcile(later)
        [touch] = touch_rows(ws)
        assert (touch.status, touch.lease_owner) == ("sending", "fast"), "the live send was taken from its worker"
        row = enrollment_rows(ws)[enrollment_id]
        assert (row.state, row.lease_owner) == ("active", "fast")
        assert Dispatcher(ws, owner="third").run(later).claimed == 0  # nobody sends it alongside

        [(channel, outbound)] = in_flight[0].outbound.items()
        fast.deliver(channel, outbound, later)
        [touch] = touch_rows(ws)
        assert touch.status == "sent" and eml_per_key(ws) == {touch.idempotency_key: 1}
    finally:
        for w in (fast_ws, slow_ws, ws):
            w.close()

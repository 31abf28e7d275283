"""What every benchmark shares: the workspace, the databases, fast seeding and a timer.

Seeding goes through SQL (`INSERT ... SELECT` over a recursive CTE on SQLite, over
`generate_series` on PostgreSQL), never through the Python enroll path: building a million
enrollments must take seconds, and what is measured is dispatch, not the set-up.
"""

from __future__ import annotations

import os
import shutil
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, create_engine, text

from relance.config import Dispatch
from relance.store import Store, UTCDateTime, metadata

# A Tuesday in March 2027, 10:30 in Paris (UTC+1): inside the window, not a holiday.
NOW = datetime(2027, 3, 16, 9, 30, tzinfo=UTC)
DUE = NOW - timedelta(hours=1)
FAR = NOW + timedelta(days=365)

PG_ADMIN_URL = os.environ.get("RELANCE_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PG_DB = os.environ.get("RELANCE_BENCH_PG_DB", "relance_bench")
PG_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + PG_DB

DEFAULT_BATCH = Dispatch.model_fields["batch_size"].default  # what a workspace gets unless it says otherwise
HUGE = 100_000_000  # capacity limits that never bind: throughput, not pacing, is measured

CONFIG = """
database: "{database}"
timezone: Europe/Paris
country: FR
company: {{name: "Acme Finance SAS", address: "12 rue de la Paix, 75002 Paris"}}
senders:
  sales:
    - {{email: marie@acme.example, name: "Marie Dupont", signature: "Marie Dupont, Acme", daily_limit: {huge}}}
    - {{email: lea@acme.example, name: "Léa Martin", signature: "Léa Martin, Acme", daily_limit: {huge}}}
limits:
  linkedin_per_day: {{visit: {huge}, invite: {huge}, message: {huge}}}
  linkedin_invites_per_week: {huge}
  calls_per_day: {huge}
  email_per_recipient_domain_per_day: {huge}
connectors:
  email: {{use: sandbox, settings: {{outbox: outbox, seed: 3, email_record: jsonl}}}}
  linkedin: {{use: sandbox, settings: {{outbox: outbox, seed: 3}}}}
  call: {{use: sandbox, settings: {{outbox: outbox, seed: 3}}}}
dispatch: {{batch_size: {batch}}}
web: {{base_url: "https://links.acme.example"}}
"""

# email, LinkedIn and call steps; seeded enrollments are spread over the five steps, so one
# dispatch run sends on every channel (40 % email, 40 % LinkedIn, 20 % call).
SEQUENCE = """
name: outbound
owner: marie@acme.example
schedule:
  timezone: prospect
  window: {days: mon-fri, hours: ["09:00-12:00", "14:00-17:30"]}
  holidays: FR
  jitter_minutes: 10
sender: {pool: sales}
exit_on: [replied, meeting_booked, bounced, unsubscribed]
steps:
  - id: intro
    email:
      template: email/intro.j2
      variants: [{id: a, subject: "Question pour {{ prospect.company }}"}, {id: b, subject: "Votre clôture mensuelle"}]
  - id: invite
    wait: 1 business day
    linkedin: {action: invite, template: linkedin/invite.j2}
  - id: call-1
    wait: 1 business day
    call: {script: call/script.j2}
  - id: follow
    wait: 2 business days
    when: "not opened('intro')"
    email: {template: email/follow.j2}
  - id: message
    wait: 1 business day
    linkedin: {action: message, template: linkedin/message.j2}
"""
STEPS = ("intro", "invite", "call-1", "follow", "message")

TEMPLATES = {
    "email/intro.j2": "Bonjour {{ prospect.first_name }},\n\nJe vous écris au sujet de {{ prospect.company }}.\n\n{% include 'email/_footer.j2' %}\n",
    "email/follow.j2": "Subject: Suite pour {{ prospect.company }}\n\n{{ prospect.first_name }}, un petit rappel.\n\n{% include 'email/_footer.j2' %}\n",
    "email/_footer.j2": "{{ sender.name }}\n{{ company.name }}, {{ company.address }}\nPour ne plus être contacté : {{ unsubscribe_url }}\n",
    "linkedin/invite.j2": "Bonjour {{ prospect.first_name }}, ravi d'échanger.",
    "linkedin/message.j2": "Merci pour la connexion, {{ prospect.first_name }} !",
    "call/script.j2": "Appeler {{ prospect.first_name }} {{ prospect.last_name }} ({{ prospect.company }}).\nQuestion : comment se passe la clôture ?\n",
}


def write_workspace(root: Path, database: str, *, batch: int = DEFAULT_BATCH) -> Path:
    """The bench workspace: one multichannel cadence, sandbox connectors in jsonl mode."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(CONFIG.format(database=database, huge=HUGE, batch=batch))
    (root / "sequences").mkdir()
    (root / "sequences" / "outbound.yaml").write_text(textwrap.dedent(SEQUENCE))
    for name, body in TEMPLATES.items():
        path = root / "templates" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    # One signing secret for every bench workspace: the same prospect gets the same
    # unsubscribe link, so runs in different workspaces write identical touch rows.
    (root / ".relance").mkdir()
    (root / ".relance" / "secret").write_text("relance-bench-secret")
    return root


# ---------------------------------------------------------------------------- databases


def ensure_pg_database() -> str | None:
    """Create the bench's own database (never the tests' one); None if PostgreSQL is down."""
    try:
        engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": PG_DB})
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{PG_DB}"'))
        engine.dispose()
        return PG_URL
    except Exception as exc:  # noqa: BLE001 - reported, and the PostgreSQL cases are skipped
        print(f"PostgreSQL unavailable ({exc}); skipping PostgreSQL cases")
        return None


def fresh_store(backend: str, workdir: Path, name: str) -> Store:
    """An empty, migrated store: a new SQLite file, or the bench database emptied."""
    if backend == "sqlite":
        path = workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return Store(f"sqlite:///{path}")
    ensure_pg_database()  # again: a shared server's databases come and go
    store = Store(PG_URL)
    names = ", ".join(t.name for t in metadata.sorted_tables)
    with store.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    settle(store)
    return store


def _series(dialect: str, lo: int, hi: int) -> tuple[str, str]:
    """(prefix, FROM clause) producing integers n in [lo, hi]."""
    if dialect == "sqlite":
        return f"WITH RECURSIVE s(n) AS (SELECT {lo} UNION ALL SELECT n + 1 FROM s WHERE n < {hi}) ", "s"
    return "", f"generate_series({lo}, {hi}) AS s(n)"


def seed(store: Store, total: int, due: int | None = None, *, now: datetime = NOW) -> None:
    """`total` prospects, each enrolled once in `outbound`; `due` of them (all by default)
    due now, spread evenly through the table; the others due in a year or completed."""
    due = total if due is None else due
    stride = max(1, total // max(due, 1))
    dialect = store.engine.dialect.name
    json_empty = "'{}'" if dialect == "sqlite" else "CAST('{}' AS JSON)"
    steps = " ".join(f"WHEN {i} THEN '{s}'" for i, s in enumerate(STEPS))
    # Due rows: n % stride = 0 (at most `due` of them); the rest alternate between a step
    # due in a year and a completed enrollment.
    is_due = f"(n % {stride} = 0 AND n / {stride} <= {due})"
    chunk = 250_000
    with store.begin() as conn:
        for lo in range(1, total + 1, chunk):
            hi = min(total, lo + chunk - 1)
            prefix, source = _series(dialect, lo, hi)
            conn.execute(
                text(
                    f"INSERT INTO prospects (id, email, first_name, last_name, company, account_key, title, phone,"
                    f" linkedin_url, timezone, country, language, attributes, source, created_at, updated_at) "
                    f"{prefix}SELECT n, 'p' || n || '@co' || (n % 20000) || '.example', 'Prénom' || (n % 997),"
                    f" 'Nom' || (n % 991), 'Société ' || (n % 20000) || ' SAS', 'co' || (n % 20000) || '.example',"
                    f" 'DAF', '+33' || (140000000 + n), 'https://www.linkedin.com/in/p' || n,"
                    f" 'Europe/Paris', 'FR', 'fr', {json_empty}, 'bench', :now, :now FROM {source}"
                ).bindparams(bindparam("now", type_=UTCDateTime)),
                {"now": now},
            )
            conn.execute(
                text(
                    f"INSERT INTO enrollments (id, prospect_id, sequence, exclusive, state, next_step_id, next_due_at,"
                    f" sender, attempts, enrolled_at, updated_at) "
                    f"{prefix}SELECT n, n, 'outbound', 1,"
                    f" CASE WHEN {is_due} OR n % 2 = 0 THEN 'active' ELSE 'completed' END,"
                    f" CASE WHEN {is_due} OR n % 2 = 0 THEN CASE n % 5 {steps} END END,"
                    f" CASE WHEN {is_due} THEN :due WHEN n % 2 = 0 THEN :far END,"
                    f" CASE n % 2 WHEN 0 THEN 'marie@acme.example' ELSE 'lea@acme.example' END,"
                    f" 0, :now, :now FROM {source}"
                ).bindparams(*(bindparam(k, type_=UTCDateTime) for k in ("now", "due", "far"))),
                {"now": now, "due": DUE, "far": FAR},
            )
        if dialect == "postgresql":
            for table in ("prospects", "enrollments"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
    if dialect == "postgresql":
        settle(store)


def settle(store: Store) -> None:
    """PostgreSQL as a store at rest is, before a timed run: vacuumed and analyzed (autovacuum
    would within a minute; left to it, it runs during the measurement, and the first reader of
    each fresh row writes its page back to set hint bits), then checkpointed, so no earlier
    load's dirty pages are flushed on the measurement's time."""
    if store.is_postgres:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            conn.execute(text("CHECKPOINT"))


def checkpoint(store: Store) -> Path:
    """Fold the WAL into the SQLite file and close it, so the file alone is the database."""
    path = Path(store.engine.url.database)
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.dispose()
    return path


def copy_sqlite(src: Path, dest: Path) -> str:
    """A copy of a checkpointed SQLite file: several measurements from one seed."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{dest}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(src, dest)
    return f"sqlite:///{dest}"


# ---------------------------------------------------------------------------- timing


@dataclass
class Timer:
    seconds: float = 0.0  # wall clock: what the targets are about
    cpu: float = 0.0  # this process's CPU time: steadier on a shared machine


@contextmanager
def timed() -> Iterator[Timer]:
    t = Timer()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t.seconds, t.cpu = time.perf_counter() - start, time.process_time() - cpu


def count(store: Store, sql: str) -> Any:
    with store.connect() as conn:
        return conn.scalar(text(sql))


def count_due(store: Store, now: datetime = NOW) -> int:
    stmt = text("SELECT count(*) FROM enrollments WHERE state = 'active' AND next_due_at <= :now").bindparams(
        bindparam("now", type_=UTCDateTime)
    )
    with store.connect() as conn:
        return conn.scalar(stmt, {"now": now})


def wait_until_recorded(flow_run_id: str, expected: int, timeout: float = 300.0) -> int:
    """The server records task runs from their events after the flow has returned: thousands of
    them keep it busy for a while, and a measurement started meanwhile would share the CPU with
    it (and meet 503s). Wait until `expected` task runs of this flow run are recorded as
    completed; returns how many were."""
    from prefect.client.orchestration import get_client

    query = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while (recorded := client.request("POST", "/task_runs/count", json=query).json()) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
    return recorded


def wait_until_idle(quiet: float = 0.05, window: float = 0.25, timeout: float = 60.0) -> bool:
    """Wait until Prefect's temporary server (a child process of the bench) uses less than
    `quiet` of a core over `window` seconds: after its task runs are recorded it still writes
    their events and logs for a while, and a flow started meanwhile shares the CPU with it and
    meets its SQLite database locked (a 503, then two seconds of client back-off). False if it
    did not settle within `timeout`."""
    import psutil

    servers = [p for p in psutil.Process().children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            before = sum(sum(p.cpu_times()[:2]) for p in servers)
            time.sleep(window)
            used = sum(sum(p.cpu_times()[:2]) for p in servers) - before
        except psutil.NoSuchProcess:
            return True
        if used < quiet * window:
            return True
    return False

"""Benchmark 4: the report over a million events, and the import of a 100k-row prospect CSV."""

from __future__ import annotations

import csv
import random
import statistics
from datetime import timedelta
from pathlib import Path

from sqlalchemy import bindparam, text

from bench.common import NOW, count, fresh_store, timed
from bench.results import Check, Section
from relance.prospects import import_csv
from relance.reports import build_report
from relance.store import Store, UTCDateTime

# ---------------------------------------------------------------------------- report

# Four events per touch, by channel: what a campaign's log looks like (sends, then responses).
_KINDS = {
    "email": ("sent", "delivered", "opened", "replied"),
    "linkedin": ("invited", "accepted", "messaged", "replied"),
    "call": ("sent", "call_voicemail", "call_connected", "meeting_booked"),
}
_STEPS = (("intro", "email"), ("invite", "linkedin"), ("call-1", "call"), ("follow", "email"), ("message", "linkedin"))
_GROUPS = {"channel": set(_KINDS), "step": {s for s, _ in _STEPS}}


def seed_events(store: Store, n: int) -> None:
    """n events: n/4 touches over five steps and three channels, two senders, A/B variants."""
    dialect = store.engine.dialect.name
    json_empty = "'{}'" if dialect == "sqlite" else "CAST('{}' AS JSON)"
    step = " ".join(f"WHEN {i} THEN '{s}'" for i, (s, _) in enumerate(_STEPS))
    channel = " ".join(f"WHEN {i} THEN '{c}'" for i, (_, c) in enumerate(_STEPS))
    kind = " ".join(
        f"WHEN {i} THEN CASE n % 4 " + " ".join(f"WHEN {j} THEN '{k}'" for j, k in enumerate(_KINDS[c])) + " END"
        for i, (_, c) in enumerate(_STEPS)
    )
    chunk = 250_000
    with store.begin() as conn:
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk) - 1
            if dialect == "sqlite":
                prefix, source = f"WITH RECURSIVE s(n) AS (SELECT {lo} UNION ALL SELECT n + 1 FROM s WHERE n < {hi}) ", "s"
            else:
                prefix, source = "", f"generate_series({lo}, {hi}) AS s(n)"
            # t = the touch (n / 4); its step is t % 5; its events are n % 4 of its channel's kinds.
            conn.execute(
                text(
                    "INSERT INTO events (occurred_at, recorded_at, kind, channel, detail, prospect_id, enrollment_id, touch_id,"
                    " sequence, step_id, variant, sender, payload, dedupe_key) "
                    f"{prefix}SELECT CASE n % 4 WHEN 0 THEN :t0 WHEN 1 THEN :t1 WHEN 2 THEN :t2 ELSE :t3 END, :t3,"
                    f" CASE (n / 4) % 5 {kind} END, CASE (n / 4) % 5 {channel} END, NULL, n / 20, n / 20, n / 4,"
                    f" 'outbound', CASE (n / 4) % 5 {step} END,"
                    " CASE WHEN (n / 4) % 5 = 0 THEN CASE (n / 4) % 2 WHEN 0 THEN 'a' ELSE 'b' END END,"
                    " CASE (n / 20) % 2 WHEN 0 THEN 'marie@acme.example' ELSE 'lea@acme.example' END,"
                    f" {json_empty}, 'bench:' || n FROM {source}"
                ).bindparams(*(bindparam(f"t{i}", type_=UTCDateTime) for i in range(4))),
                {f"t{i}": NOW - timedelta(days=30) + timedelta(hours=6 * i) for i in range(4)},
            )
    if dialect == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE events"))  # what autovacuum does after a bulk load


def run_report(work: Path, backends: list[str], n: int) -> Section:
    work.mkdir(parents=True, exist_ok=True)
    s = Section("4a. report", f"4a. Report over {n:,} events (build_report)")
    s.notes = [
        f"{n:,} events ({n // 4:,} touches, four events each: sends and responses) over five steps, three channels, two"
        " senders and an A/B variant, seeded with INSERT ... SELECT. Each report is run three times (the first one cold);"
        " the median is checked. PostgreSQL is VACUUM ANALYZEd after the load, as autovacuum would.",
    ]
    s.headers = ["backend", "events", "report", "run 1 s", "run 2 s", "run 3 s", "median s", "groups"]
    for backend in backends:
        store = fresh_store(backend, work, "events")
        with timed() as t:
            seed_events(store, n)
        s.notes.append(f"{backend}: seeded {count(store, 'SELECT count(*) FROM events'):,} events in {t.seconds:.1f} s.")
        expected_sent = count(store, "SELECT count(DISTINCT touch_id) FROM events WHERE channel = 'email' AND kind = 'sent'")
        for by in ("channel", "step"):
            times = []
            for _ in range(3):
                with store.connect() as conn, timed() as t:
                    report = build_report(conn, by=by)
                times.append(t.seconds)
            median = statistics.median(times)
            sent = report.totals.get("email_sent")
            groups = len(report.rows)
            s.rows.append([backend, n, f"by {by}", *(round(x, 3) for x in times), round(median, 3), groups])
            # A fast report is worth something only if it is right: its totals against a plain count.
            right = sent == expected_sent and groups == len(_GROUPS[by])
            s.checks.append(Check(
                f"{backend}: report by {by} over {n:,} events < 3 s",
                f"{median:.2f} s (email sent {sent:,}" + ("" if right else f", but {expected_sent:,} in the log; {groups} groups") + ")",
                median < 3 and right,
            ))  # fmt: skip
        store.dispose()
    return s


# ---------------------------------------------------------------------------- import

HEADER = ["Email", "Prénom", "Nom", "Société", "Poste", "Téléphone", "LinkedIn", "Pays", "Langue"]
FIRST = ["Camille", "Léa", "Hugo", "Chloé", "Louis", "Inès", "Jules", "Manon", "Élodie", "Théo", "Zoé", "Nathan"]
LAST = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau", "Simon"]
TITLES = ["DAF", "Directeur financier", "CFO", "Responsable comptable", "VP Finance", "Contrôleur de gestion"]


def write_csv(path: Path, n: int, seed: int = 11) -> None:
    """A realistic file: accents, colleagues at one company, national and international phones,
    LinkedIn links pasted in several shapes, missing fields, ~1 % bad rows, ~1 % duplicates."""
    rnd = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for i in range(n):
            j = i - 1 if i and rnd.random() < 0.01 else i  # a duplicate of the previous person
            first, last = FIRST[j % len(FIRST)], LAST[(j // 7) % len(LAST)]
            company = f"Société {j % 8000} SAS"
            email = f"{first.lower()}.{last.lower()}{j}@societe-{j % 8000}.example"
            if rnd.random() < 0.01:
                email = f"{first}.{last}{j}@@broken"  # rejected: invalid address
            digits = f"{j % 100_000_000:08d}"
            phone = (f"06 {digits[:2]} {digits[2:4]} {digits[4:6]} {digits[6:]}" if j % 3 else f"+33 1 {digits[:2]} {digits[2:4]} {digits[4:6]} {digits[6:]}") if j % 4 else ""
            linkedin = ("https://www.linkedin.com/in/" if j % 2 else "linkedin.com/in/") + f"{first.lower()}-{last.lower()}-{j}" if j % 5 else ""
            country = ("FR" if j % 3 else "France") if j % 7 else ""
            w.writerow([email, first, last, company, TITLES[j % len(TITLES)], phone, linkedin, country, "fr" if j % 2 else "Français"])


def run_import(work: Path, backends: list[str], n: int) -> Section:
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"prospects-{n}.csv"
    write_csv(path, n)
    s = Section("4b. import", f"4b. Import of a {n:,}-row prospect CSV (import_csv)")
    s.notes = [
        f"A generated {n:,}-row CSV with French headers, accents, national and international phones, LinkedIn links in"
        " several shapes, missing fields, ~1 % invalid emails and ~1 % duplicates; full validation (email_validator,"
        " phonenumbers, time zone derivation) into an empty store, as `relance import` runs it: a file this size is validated by"
        " worker processes (one per core but this one) while this process writes the batches.",
    ]
    s.headers = ["backend", "rows", "seconds", "rows/s", "imported", "rejected", "duplicates"]
    for backend in backends:
        store = fresh_store(backend, work, "import")
        with timed() as t:
            report = import_csv(store, path, now=NOW, workers=None)  # as `relance import` runs it
        rate = n / t.seconds
        stored = count(store, "SELECT count(*) FROM prospects")
        s.rows.append([backend, n, round(t.seconds, 2), round(rate), report.imported, len(report.rejected), report.duplicates])
        # Every row accounted for (imported, rejected with its reason, or a duplicate) and every
        # imported prospect really in the store.
        whole = report.total == n and stored == report.imported
        s.checks.append(Check(
            f"{backend}: import >= 5,000 rows/s",
            f"{rate:,.0f} rows/s" + ("" if whole else f", but {report.total:,} of {n:,} rows accounted for, {stored:,} prospects stored"),
            rate >= 5000 and whole,
        ))  # fmt: skip
        store.dispose()
    return s

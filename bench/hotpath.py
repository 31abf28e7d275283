"""Item 5 of issue 3: what dominates the hot path of Dispatcher.run.

Three views of runs over the same seeded store: the time per phase (no profiler), the time
per SQL statement (cursor events), and a cProfile of the whole run (py-spy and pyinstrument
are not dependencies of the project; cProfile's overhead inflates small Python functions,
so its shares are read against the phase split).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import event

from bench.common import (
    NOW,
    checkpoint,
    copy_sqlite,
    fresh_store,
    seed,
    write_workspace,
)
from bench.results import Section
from relance.dispatch import Dispatcher
from relance.workspace import Workspace

OURS = ("/relance/", "/connectors/", "/flows/")


def _workspace(work: Path, template: Path, label: str) -> Workspace:
    url = copy_sqlite(template, work / f"{label}.db")
    return Workspace.load(write_workspace(work / f"ws-{label}", url))


def run(work: Path, n: int) -> Section:
    work.mkdir(parents=True, exist_ok=True)
    store = fresh_store("sqlite", work, "seed")
    seed(store, n)
    template = checkpoint(store)
    s = Section("5. profile", f"5. Profile of Dispatcher.run over {n:,} due enrollments (SQLite)")

    # Phases, no profiler.
    ws = _workspace(work, template, "phases")
    d = Dispatcher(ws)
    phases: Counter[str] = Counter()
    for name in ("reconcile", "claim", "prepare", "deliver"):
        original = getattr(d, name)

        def wrapped(*a, _f=original, _n=name, **k):
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                phases[_n] += time.perf_counter() - t0

        setattr(d, name, wrapped)
    # SQL statements, timed at the cursor.
    sql_time: Counter[str] = Counter()
    sql_count: Counter[str] = Counter()

    def before(conn, cursor, statement, parameters, context, executemany):
        conn.info["bench_t0"] = time.perf_counter()

    def after(conn, cursor, statement, parameters, context, executemany):
        key = " ".join(statement.split())[:80] + (" (executemany)" if executemany else "")
        sql_time[key] += time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())
        sql_count[key] += 1

    event.listen(ws.store.engine, "before_cursor_execute", before)
    event.listen(ws.store.engine, "after_cursor_execute", after)
    t0 = time.perf_counter()
    d.run(NOW)
    total = time.perf_counter() - t0
    ws.close()
    s.notes = [f"Without the profiler: {total:.1f} s, {n / total:,.0f} touches/s."]
    s.headers = ["phase", "seconds", "share"]
    s.rows = [[p, round(v, 2), f"{v / total:.0%}"] for p, v in phases.most_common()]
    sql_total = sum(sql_time.values())
    lines = [
        f"### SQL at the cursor: {sql_total:.2f} s of {total:.2f} s ({sql_total / total:.0%}); the rest is Python",
        "",
        "| statement | calls | seconds |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| `{k.replace('|', '/')}` | {sql_count[k]:,} | {v:.3f} |" for k, v in sql_time.most_common(12)]

    # cProfile.
    ws = _workspace(work, template, "cprofile")
    d = Dispatcher(ws)
    profiler = cProfile.Profile()
    profiler.enable()
    d.run(NOW)
    profiler.disable()
    ws.close()
    stats = pstats.Stats(profiler)
    entries = stats.stats  # type: ignore[attr-defined]
    profiled = sum(tt for (_, _, _), (_, _, tt, _, _) in entries.items())
    ours = sorted(
        ((ct, nc, f"{Path(f).parent.name}/{Path(f).name}:{line}({fn})") for (f, line, fn), (_, nc, _, ct, _) in entries.items() if any(o in f for o in OURS)),
        reverse=True,
    )
    lines += [
        "",
        f"### cProfile, project functions by cumulative time (profiled total {profiled:.1f} s)",
        "",
        "| function | calls | cumulative s | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| `{name}` | {nc:,} | {ct:.2f} | {ct / profiled:.0%} |" for ct, nc, name in ours[:22]]
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    body = out.getvalue()
    body = body[body.find("ncalls") :] if "ncalls" in body else body
    lines += ["", "### cProfile, all functions by own time (top 15)", "", "```", body.strip(), "```"]
    s.extra = "\n".join(lines)
    return s

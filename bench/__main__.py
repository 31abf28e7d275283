"""`python -m bench [--quick] [--only NAME[,NAME]] [--no-postgres]`: run the benchmarks of
issue 3 and rewrite bench/RESULTS.md with the figures, the ratios and PASS/FAIL per target."""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

# Before anything imports Prefect: its home (and its temporary server's database) lives in
# the bench's scratch directory, and it phones nobody.
WORK = Path(tempfile.mkdtemp(prefix="relance-bench-"))
(WORK / "prefect").mkdir()
os.environ["PREFECT_HOME"] = str(WORK / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy 2-core machine
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # the API still gets INFO
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "ERROR")  # the naive run's backlog warnings
os.environ.pop("PREFECT_API_URL", None)  # a temporary server, never someone's real one
# The temporary server batches its writes as it does under the `relance` commands.
from relance.cli import BATCHED_SERVER_WRITES  # noqa: E402  (imports no Prefect)

for _name, _value in BATCHED_SERVER_WRITES.items():
    os.environ.setdefault(_name, _value)
KEEP = False


@atexit.register
def _cleanup() -> None:
    if not KEEP:
        shutil.rmtree(WORK, ignore_errors=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # atexit then stops Prefect's temporary server and cleans up


signal.signal(signal.SIGTERM, _terminate)


import argparse
import time
import traceback
from datetime import UTC, datetime

from bench import results
from bench.common import ensure_pg_database

HERE = Path(__file__).resolve().parent
NAMES = ("throughput", "due-query", "memory", "scale-out", "report", "import", "profile")


def sizes(quick: bool) -> dict:
    """What each benchmark runs; the `optional` sizes run only if their projected time, from a
    smaller size measured earlier in the same run, fits in --budget seconds."""
    if quick:
        return {
            "throughput": {"sqlite": [5_000], "postgresql": [2_000]},
            "throughput_optional": {},
            "naive": 200,
            "throughput_rounds": 1,
            "due": (10_000, 50_000),
            "due_rounds": 2,
            "memory": [5_000, 15_000],
            "memory_optional": None,
            "events": 200_000,
            "import": 20_000,
            "profile": 3_000,
            "scale_out": 5_000,
        }
    return {
        "throughput": {"sqlite": [10_000, 100_000], "postgresql": [10_000]},
        "throughput_optional": {"postgresql": 100_000},
        "naive": 2_000,
        "throughput_rounds": 3,
        "due": (10_000, 1_000_000),
        "due_rounds": 7,
        "memory": [10_000, 100_000],
        "memory_optional": 1_000_000,
        "events": 1_000_000,
        "import": 100_000,
        "profile": 10_000,
        "scale_out": 100_000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 3 minutes)")
    parser.add_argument("--only", action="append", default=[], help=f"run only these ({', '.join(NAMES)}); repeat or comma-separate")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds an optional size (PostgreSQL 100k, memory 1M) may take, projected")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--keep", action="store_true", help=f"keep the scratch directory ({WORK})")
    args = parser.parse_args(argv)
    global KEEP
    KEEP = args.keep
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(NAMES)})")
    chosen = [n for n in NAMES if not only or n in only]
    command = "python -m bench" + ("" if argv is None and len(sys.argv) == 1 else " " + shlex.join(sys.argv[1:] if argv is None else argv))
    started = datetime.now(UTC)
    load_before = results.load_average()
    pg_url = None if args.no_postgres else ensure_pg_database()
    backends = ["sqlite"] + (["postgresql"] if pg_url else [])
    cfg = sizes(args.quick)
    print(f"scratch directory {WORK}; benchmarks: {', '.join(chosen)}; backends: {', '.join(backends)}", flush=True)
    sections: list[results.Section] = []
    done: dict[str, results.Section] = {}
    # Throughput runs last, though reported first: its naive runs leave Prefect's temporary
    # server digesting thousands of task runs for a while, which must not be charged to the
    # benchmarks after it (on 2 cores, the due-query ratio read 1.7 instead of 1.2).
    order = [n for n in chosen if n != "throughput"] + [n for n in chosen if n == "throughput"]
    for name in order:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            section = RUNNERS[name](cfg, backends, args)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark still leaves a report
            traceback.print_exc()
            section = results.Section(name, name, error=f"{type(exc).__name__}: {exc}")
        section.seconds = time.perf_counter() - t0
        done[name] = section
        sections = [done[n] for n in chosen if n in done]
        for c in section.checks:
            print(f"   {c.verdict:4} {c.target}: {c.measured}", flush=True)
        print(f"   ({section.seconds:.0f} s)", flush=True)
        # Written after every benchmark: an interrupted run still leaves its figures.
        results.write(args.output, command, started, results.versions(pg_url), sections, load_before)
    print(f"wrote {args.output}")
    return 0 if all(c.ok is not False for s in sections for c in s.checks) and not any(s.error for s in sections) else 1


# ---------------------------------------------------------------------------- runners


def _echo(bench, backend: str, n: int, modes: tuple[str, ...] = ("floor", "Dispatcher.run", "dispatch flow")) -> None:
    for row in bench.medians():
        if row.backend == backend and row.n == n and row.mode in modes:
            print(f"   {row.backend} {row.n:,} {row.mode}: {row.seconds:.2f} s, {row.rate:,.0f} touches/s (rounds: {bench.spread(row)})", flush=True)


def run_throughput(cfg: dict, backends: list[str], args: argparse.Namespace) -> results.Section:
    from bench.throughput import Throughput

    bench = Throughput(WORK / "throughput", sizes={b: cfg["throughput"][b] for b in backends}, naive_sample=cfg["naive"], rounds=cfg["throughput_rounds"])
    bench.work.mkdir(parents=True, exist_ok=True)
    warm = bench.warm_up()
    print(f"   Prefect warm-up (temporary server start): {warm:.1f} s", flush=True)
    skipped = []
    for backend in backends:
        for n in bench.sizes[backend]:
            t0 = time.perf_counter()
            bench.measure(backend, n)
            spent = time.perf_counter() - t0
            _echo(bench, backend, n)
        optional = cfg["throughput_optional"].get(backend)
        if optional:
            base = max(bench.sizes[backend])
            projected = spent * optional / base
            if projected <= args.budget:
                bench.measure(backend, optional)
                _echo(bench, backend, optional)
            else:
                skipped.append(f"{backend} {optional:,} skipped: projected ~{projected:.0f} s from the {base:,} run, over --budget {args.budget:.0f} s.")
    # The naive runs go last: their thousands of task runs keep the temporary server busy
    # for a while afterwards, which must not be charged to the dispatch flow.
    for backend in backends:
        bench.measure_naive(backend)
        _echo(bench, backend, cfg["naive"], modes=("naive",))
    section = bench.section()
    section.notes.append(f"Prefect temporary server start-up (warm-up flow, not counted): {warm:.1f} s.")
    section.notes += [f"**{s}**" for s in skipped]
    return section


def run_due_query(cfg: dict, backends: list[str], args: argparse.Namespace) -> results.Section:
    from bench.due_query import run

    return run(WORK / "due", backends, *cfg["due"], rounds=cfg["due_rounds"])


def run_memory(cfg: dict, backends: list[str], args: argparse.Namespace) -> results.Section:
    from bench.memory import run

    return run(WORK / "memory", cfg["memory"], cfg["memory_optional"], args.budget)


def run_scale_out(cfg: dict, backends: list[str], args: argparse.Namespace) -> results.Section:
    from bench.scaleout import run

    if "postgresql" not in backends:
        return results.Section("6. scale-out", "6. Scale-out on PostgreSQL", error="needs PostgreSQL")
    return run(WORK / "scale-out", cfg["scale_out"])


def run_report(cfg: dict, backends: list[str], args: argparse.Namespace) -> results.Section:
    from bench.report_import import run_report

    return run_report(WORK / "report", backends, cfg["events"])


def run_import(cfg: dict, backends: list[str], args: argparse.Namespace) -> results.Section:
    from bench.report_import import run_import

    return run_import(WORK / "import", backends, cfg["import"])


def run_profile(cfg: dict, backends: list[str], args: argparse.Namespace) -> results.Section:
    from bench.hotpath import run

    return run(WORK / "profile", cfg["profile"])


RUNNERS = {
    "throughput": run_throughput,
    "due-query": run_due_query,
    "memory": run_memory,
    "scale-out": run_scale_out,
    "report": run_report,
    "import": run_import,
    "profile": run_profile,
}

if __name__ == "__main__":
    sys.exit(main())

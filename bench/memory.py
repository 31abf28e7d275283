"""Benchmark 3: peak RSS of a dispatch run (Dispatcher.run, in a fresh process per size) must
stay flat as the number of due enrollments grows, and under 400 MB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.child import RUNS, run_child
from bench.common import checkpoint, fresh_store, seed, timed, write_workspace
from bench.results import Check, Section

LIMIT_MB = 400
FLAT = 1.3


def measure(work: Path, n: int) -> dict[str, Any]:
    store = fresh_store("sqlite", work, f"mem-{n}")
    seed(store, n)
    url = f"sqlite:///{checkpoint(store)}"
    result = run_child(write_workspace(work / f"ws-{n}", url), ("sqlite", n))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{work / f'mem-{n}.db'}{suffix}").unlink(missing_ok=True)
    return result


def run(work: Path, sizes: list[int], optional: int | None, budget: float) -> Section:
    work.mkdir(parents=True, exist_ok=True)
    s = Section("3. memory", "3. Memory: peak RSS of Dispatcher.run as the number of due enrollments grows")
    s.notes = [
        "SQLite, everyone due at once, the multichannel cadence of benchmark 1; each size runs in a fresh child process"
        " (`python -m bench.child`) and reports its VmHWM (peak RSS of its own address space; not `ru_maxrss`, which"
        " Linux inherits from the parent at fork), so interpreter, imports and connectors are in every figure.",
    ]
    measured: dict[int, dict[str, Any]] = {}
    for n in sizes:
        reused = ("sqlite", n) in RUNS
        measured[n] = RUNS.get(("sqlite", n)) or measure(work, n)
        if reused:
            s.notes.append(f"The {n:,} run is the Dispatcher.run measurement of benchmark 1 (same process, same method).")
    if optional:
        largest = measured[max(measured)]
        rate = sum(largest["summary"]["sent"].values()) / largest["seconds"]
        projected = optional / rate
        if projected <= budget:
            with timed() as t:
                measured[optional] = measure(work, optional)
            s.notes.append(f"{optional:,}: projected {projected:.0f} s from the {max(sizes):,} run's rate, took {t.seconds:.0f} s.")
        else:
            s.notes.append(
                f"**{optional:,} skipped:** at the {rate:,.0f} touches/s Dispatcher.run reached at {max(sizes):,}, it would take"
                f" ~{projected:.0f} s, over this run's budget of {budget:.0f} s (`--budget`). Flatness is checked"
                f" between {min(sizes):,} and {max(sizes):,} instead."
            )
    s.headers = ["due enrollments", "seconds", "touches/s", "RSS before run MB", "peak RSS MB", "peak - before MB", "peak / smallest"]
    smallest = measured[min(measured)]["peak_rss"]
    for n in sorted(measured):
        r = measured[n]
        sent = sum(r["summary"]["sent"].values())
        s.rows.append([
            n, round(r["seconds"], 1), round(sent / r["seconds"]), round(r["rss_before"] / 2**20), round(r["peak_rss"] / 2**20),
            round((r["peak_rss"] - r["rss_before"]) / 2**20), f"{r['peak_rss'] / smallest:.2f}",
        ])  # fmt: skip
        # A run that stopped short would also stay small: it counts only if it sent everyone.
        s.checks.append(Check(
            f"peak RSS at {n:,} due < {LIMIT_MB} MB",
            f"{r['peak_rss'] / 2**20:.0f} MB" + ("" if sent == n else f", but sent {sent:,} of {n:,}"),
            r["peak_rss"] < LIMIT_MB * 2**20 and sent == n,
        ))  # fmt: skip
    lo, hi = min(measured), max(measured)
    ratio = measured[hi]["peak_rss"] / smallest
    s.checks.append(Check(f"peak RSS flat: {hi:,} vs {lo:,} due, ratio <= {FLAT}", f"{ratio:.2f}", ratio <= FLAT))
    return s

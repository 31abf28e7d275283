"""The benchmarks' own runs at toy sizes: each does the whole job it times, and a figure from a
run that did less is a FAIL, however fast."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.report_import
from bench import memory
from bench.report_import import run_import, run_report, seed_events
from relance.reports import build_report
from relance.store import Store


def test_seeded_events_report_four_kinds_over_three_channels_and_five_steps(store: Store) -> None:
    seed_events(store, 2_000)  # 500 touches: 200 email, 200 LinkedIn, 100 call

    with store.connect() as conn:
        by_channel = build_report(conn, by="channel")
        by_step = build_report(conn, by="step")

    assert by_channel.totals["email_sent"] == 200
    assert len(by_channel.rows) == 3 and len(by_step.rows) == 5


def test_the_report_benchmark_checks_its_totals_against_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    right = run_report(tmp_path / "right", ["sqlite"], 2_000)
    # A report that skipped rows would be faster and wrong.
    monkeypatch.setattr(bench.report_import, "build_report", lambda conn, by: build_report(conn, by=by, sequence="another"))
    wrong = run_report(tmp_path / "wrong", ["sqlite"], 2_000)

    assert [c.verdict for c in right.checks] == ["PASS", "PASS"]
    assert [c.verdict for c in wrong.checks] == ["FAIL", "FAIL"]
    assert "but 200 in the log" in wrong.checks[0].measured


def test_the_import_benchmark_accounts_for_every_row(tmp_path: Path) -> None:
    section = run_import(tmp_path, ["sqlite"], 600)

    [row] = section.rows
    backend, rows, _, _, imported, rejected, duplicates = row
    assert (backend, rows) == ("sqlite", 600)
    assert imported + rejected + duplicates == 600 and rejected > 0 and duplicates > 0
    assert ", but" not in section.checks[0].measured


def test_the_memory_benchmark_runs_each_size_in_a_process_of_its_own(tmp_path: Path) -> None:
    section = memory.run(tmp_path, [100, 300], None, 0)

    assert [c.verdict for c in section.checks] == ["PASS", "PASS", "PASS"]
    assert [r[0] for r in section.rows] == [100, 300]

"""What the bench concludes from its measurements: the verdicts, and RESULTS.md."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.results import Check, Section, write
from bench.throughput import Row, Throughput


def _throughput(tmp_path: Path, flow_seconds: tuple[float, ...] = (1.02, 0.97, 1.00)) -> Throughput:
    t = Throughput(tmp_path, sizes={"sqlite": [10_000]}, naive_sample=2_000)
    for seconds in (0.27, 0.26, 0.30):
        t.rows.append(Row("sqlite", 10_000, "floor", seconds, 10_000))
    for seconds in flow_seconds:
        t.rows.append(Row("sqlite", 10_000, "dispatch flow", seconds, 10_000))
    for seconds in (7.2, 7.1, 7.3):
        t.rows.append(Row("sqlite", 2_000, "naive", seconds, 2_000))
    t.digests[("sqlite", 10_000)] = {mode: {"same"} for mode in ("floor", "Dispatcher.run", "dispatch flow")}
    return t


def _verdicts(section: Section) -> dict[str, str]:
    return {c.target: c.verdict for c in section.checks}


def test_each_target_is_judged_on_the_median_round(tmp_path: Path) -> None:
    verdicts = _verdicts(_throughput(tmp_path).section())

    assert verdicts == {
        "every round claimed and sent every enrollment; the floor, Dispatcher.run and the flow wrote the same touch rows": "PASS",
        "SQLite 10,000: >= 5,000 touches/s end to end (flow)": "PASS",  # 10,000 / 1.00 s
        "sqlite 10,000: flow <= 4x floor time": "PASS",  # 1.00 / 0.27
        "sqlite 10,000: flow >= 30x faster than naive": "PASS",  # 10,000/s against 2,000 / 7.2 s
    }


def test_a_slow_median_fails_its_targets(tmp_path: Path) -> None:
    verdicts = _verdicts(_throughput(tmp_path, flow_seconds=(0.9, 2.1, 2.2)).section())

    assert verdicts["SQLite 10,000: >= 5,000 touches/s end to end (flow)"] == "FAIL"
    assert verdicts["sqlite 10,000: flow <= 4x floor time"] == "FAIL"
    assert verdicts["sqlite 10,000: flow >= 30x faster than naive"] == "FAIL"


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda t: t.digests[("sqlite", 10_000)]["dispatch flow"].add("other"), id="different touch rows"),
        pytest.param(lambda t: t._check_summary("sqlite", 10_000, "flow", {"claimed": 10_000, "sent": {"email": 9_999}}), id="one touch short"),
        pytest.param(lambda t: t._attempt("sqlite 10,000 floor", lambda: 1 / 0), id="a failed round"),
    ],
)
def test_fast_figures_from_an_incomplete_or_different_run_fail(tmp_path: Path, spoil) -> None:
    t = _throughput(tmp_path)
    spoil(t)
    section = t.section()

    validity = section.checks[0]
    assert validity.verdict == "FAIL" and validity.measured
    assert [c.verdict for c in section.checks[1:]] == ["PASS", "PASS", "PASS"]  # the figures alone would pass


def test_results_open_with_the_command_and_a_summary_of_every_verdict(tmp_path: Path) -> None:
    passing = Section("1. throughput", "1. Throughput", checks=[Check("a | b", "5 | 6", True)], seconds=3)
    broken = Section("2. due query", "2. Due query", error="RuntimeError: claimed 999 of 1000", checks=[Check("ratio", "1.6", False)])
    out = tmp_path / "RESULTS.md"

    write(out, "python -m bench --quick", datetime(2026, 12, 5, 9, 11, tzinfo=UTC), {"python": "3.11", "sqlite": "3.40", "platform": "linux"}, [passing, broken], "0.1")

    text = out.read_text()
    assert "- command: `python -m bench --quick`" in text and "2026-12-05 09:11 UTC" in text
    assert "| 1. throughput | a \\| b | 5 \\| 6 | **PASS** |" in text
    assert "| 2. due query | ratio | 1.6 | **FAIL** |" in text
    assert "**Error:** `RuntimeError: claimed 999 of 1000`" in text

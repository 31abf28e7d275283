"""Benchmark results and the RESULTS.md they are written to."""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class Check:
    """One target of issue 3 and whether this run met it."""

    target: str
    measured: str
    ok: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "FAIL")


@dataclass
class Section:
    name: str
    title: str
    notes: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    extra: str = ""  # more markdown: query plans, profiles
    seconds: float = 0.0
    error: str | None = None

    def to_markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.error:
            lines += [f"**Error:** `{self.error}`", ""]
        for i, note in enumerate(self.notes):  # paragraphs, and bullets kept together
            lines.append(note)
            nxt = self.notes[i + 1] if i + 1 < len(self.notes) else None
            if not (note.startswith("- ") and nxt is not None and nxt.startswith("- ")):
                lines.append("")
        if self.checks:
            lines += ["| target (issue 3) | measured | verdict |", "| --- | --- | --- |"]
            lines += [f"| {_cell(c.target)} | {_cell(c.measured)} | **{c.verdict}** |" for c in self.checks]
            lines.append("")
        if self.headers:
            lines.append("| " + " | ".join(_cell(h) for h in self.headers) + " |")
            lines.append("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(self.headers))) + "|")
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
            lines.append("")
        if self.extra:
            lines += [self.extra.rstrip(), ""]
        lines += [f"_Benchmark wall time: {self.seconds:.0f} s._", ""]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def versions(pg_url: str | None) -> dict[str, str]:
    out = {
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }
    try:
        import prefect
        import sqlalchemy

        out["prefect"] = prefect.__version__
        out["sqlalchemy"] = sqlalchemy.__version__
    except ImportError:
        pass
    if pg_url:
        try:
            from sqlalchemy import create_engine, text

            engine = create_engine(pg_url)
            with engine.connect() as conn:
                out["postgresql"] = conn.scalar(text("SHOW server_version"))
            engine.dispose()
        except Exception as exc:  # noqa: BLE001
            out["postgresql"] = f"unavailable ({type(exc).__name__})"
    else:
        out["postgresql"] = "not used"
    return out


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def write(path: Path, command: str, started: datetime, info: dict[str, str], sections: list[Section], load_before: str) -> None:
    total = sum(s.seconds for s in sections)
    checks = [(s, c) for s in sections for c in s.checks]
    lines = [
        "# Relance benchmarks",
        "",
        "Written by `python -m bench` (issue 3, DESIGN.md section 9). Every ratio is taken",
        "against a baseline measured in the same run, because the machine is shared and noisy.",
        "",
        f"- command: `{command}`",
        f"- date: {started.astimezone(UTC):%Y-%m-%d %H:%M} UTC, {total / 60:.1f} min",
        f"- nproc: {os.cpu_count()}; load average before / after: {load_before} / {load_average()}",
        f"- Python {info['python']}, SQLite {info['sqlite']}, PostgreSQL {info.get('postgresql')}, "
        f"Prefect {info.get('prefect', '?')}, SQLAlchemy {info.get('sqlalchemy', '?')}",
        f"- platform: {info['platform']}",
        "",
        "## Summary",
        "",
        "| benchmark | target (issue 3) | measured | verdict |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {s.name} | {_cell(c.target)} | {_cell(c.measured)} | **{c.verdict}** |" for s, c in checks]
    lines.append("")
    for s in sections:
        lines.append(s.to_markdown())
    path.write_text("\n".join(lines))

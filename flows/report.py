"""The report flow: per-channel tables and a markdown summary as Prefect artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows._common import FLOW_OPTIONS, open_workspace
from relance.reports import build_report


@flow(name="report", **FLOW_OPTIONS)
def report(workspace: str = ".", sequence: str | None = None, since: datetime | None = None) -> dict[str, Any]:
    ws = open_workspace(workspace)
    try:
        with ws.store.connect() as conn:
            result = build_report(conn, by="channel", sequence=sequence, since=since)
            by_step = build_report(conn, by="step", sequence=sequence, since=since)
        for channel, rows in result.artifact_tables().items():
            create_table_artifact(table=rows, key=f"report-{channel}", description=f"{channel}: per channel")
        for channel, rows in by_step.artifact_tables().items():
            create_table_artifact(table=rows, key=f"report-{channel}-by-step", description=f"{channel}: per step")
        create_markdown_artifact(markdown=result.to_markdown(), key="report", description="Relance report")
        return {"rows": result.rows, "totals": result.totals}
    finally:
        ws.close()

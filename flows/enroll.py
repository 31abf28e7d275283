"""The enroll flow: import a prospect file, then enroll the matching prospects."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows._common import FLOW_OPTIONS, clock, open_workspace
from relance.enrollment import enroll as enroll_prospects
from relance.prospects import find_prospects, import_csv


@flow(name="enroll", **FLOW_OPTIONS)
def enroll(
    sequence: str,
    workspace: str = ".",
    csv_file: str | None = None,
    where: dict[str, str] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    now = clock(now)
    logger = get_run_logger()
    ws = open_workspace(workspace)
    try:
        seq = ws.sequence(sequence)
        result: dict[str, Any] = {}
        if csv_file:
            imported = import_csv(
                ws.store, Path(csv_file), now=now, default_country=ws.config.country, default_timezone=ws.config.timezone, workers=None
            )
            result["imported"] = imported.imported
            result["updated"] = imported.updated
            result["rejected"] = [f"line {r.row_number}: {r.reason}" for r in imported.rejected]
            for line in result["rejected"]:
                logger.warning("%s: %s", csv_file, line)
        with ws.store.connect() as conn:
            ids = find_prospects(conn, where=where)
        report = enroll_prospects(ws, seq, ids, now)
        result["enrolled"] = report.enrolled
        result["skipped"] = dict(report.skipped)
        logger.info("enroll %s: %s", sequence, result)
        return result
    finally:
        ws.close()

"""The retention flow: personal data of prospects idle for the retention period is blanked."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows._common import FLOW_OPTIONS, clock, open_workspace
from relance.privacy import expire_idle_prospects


@flow(name="retention", **FLOW_OPTIONS)
def retention(workspace: str = ".", now: datetime | None = None, dry_run: bool = False) -> dict[str, Any]:
    ws = open_workspace(workspace)
    try:
        days = ws.config.privacy.retention_days
        if days is None:
            get_run_logger().info("privacy.retention_days is not set in config.yaml: personal data is kept")
            return {"expired": 0, "retention_days": None}
        summary = expire_idle_prospects(ws.store, clock(now), days, dry_run=dry_run)
        get_run_logger().info(str(summary))
        create_markdown_artifact(markdown=f"# Retention\n\n{summary}.\n", key="retention", description="Last retention sweep")
        return summary.as_dict()
    finally:
        ws.close()

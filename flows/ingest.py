"""The ingest flow: poll the connectors that poll; webhooks come through the web app."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task

from prefect.utilities.annotations import quote

from flows._common import FLOW_OPTIONS, TASK_OPTIONS, clock, open_workspace
from relance.channels import Capability
from relance.events import Channel
from relance.ingest import IngestSummary, ingest as ingest_events
from relance.workspace import Workspace


@task(name="poll", task_run_name="poll-{channel}", retries=2, retry_delay_seconds=10, **TASK_OPTIONS)
def poll_channel(ws: Workspace, channel: Channel, now: datetime) -> IngestSummary:
    """Poll one connector until it has nothing more; events are deduped, so a retry is harmless."""
    connector = ws.connector(channel)
    summary = IngestSummary()
    while batch := list(connector.poll(now)):
        summary.merge(ingest_events(ws, batch, now))
    return summary


def ingest_due(ws: Workspace, now: datetime) -> IngestSummary:
    """The body of an ingest run: one poll task per connector that polls."""
    total = IngestSummary()
    for channel in ws.config.connectors:
        connector = ws.connector(Channel(channel))
        if Capability.polling in type(connector).capabilities:
            total.merge(poll_channel(quote(ws), Channel(channel), now))
    get_run_logger().info("ingest at %s: %s", now.isoformat(), total.as_dict())
    return total


@flow(name="ingest", **FLOW_OPTIONS)
def ingest(workspace: str = ".", now: datetime | None = None) -> dict[str, Any]:
    ws = open_workspace(workspace)
    try:
        return ingest_due(ws, clock(now)).as_dict()
    finally:
        ws.close()

"""The tick flow: ingest, then dispatch, in one flow run.

What `relance run` and the simulated clock fire: responses are recorded (and end their
cadences) before anything due is sent, and one flow run per tick halves Prefect's per-run
cost when a demo simulates weeks of ticks. Deployments keep dispatch and ingest on their own
schedules (prefect.yaml).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow

from flows._common import FLOW_OPTIONS, clock, open_workspace
from flows.dispatch import dispatch_due
from flows.ingest import ingest_due


@flow(name="tick", **FLOW_OPTIONS)
def tick(workspace: str = ".", now: datetime | None = None) -> dict[str, Any]:
    now = clock(now)
    ws = open_workspace(workspace)
    try:
        ingested = ingest_due(ws, now)
        dispatched = dispatch_due(ws, now)
        return {"ingest": ingested.as_dict(), "dispatch": dispatched.as_dict()}
    finally:
        ws.close()

"""Issue 3, item 9, in Prefect: a terminal send failure is visible in the flow run itself,
where the operator of a deployment looks, not only in the store."""

from __future__ import annotations

import asyncio

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler

from flows.dispatch import dispatch
from relance.store import touches
from relance.workspace import Workspace
from tests.conftest import database_url
from tests.faults import START, enroll_many, fault_workspace, touch_rows

pytestmark = pytest.mark.prefect


def test_terminal_failures_are_reported_in_the_dispatch_run(backend: str, tmp_path: Path):
    """The run completes (one rejected prospect is no reason to fail a batch), and its logs
    and its dispatch-summary artifact name each rejected touch and the provider's reason."""
    root = fault_workspace(tmp_path / "ws", database_url(backend, tmp_path), email_settings="fail_rate: 0.5, fail_kind: terminal")
    ws = Workspace.load(root)
    # Two, as in test_flows.py, whose artifact check reads any `dispatch-summary` of the session
    # ("| claimed | 2 |"); with this seed one of the two is rejected.
    enroll_many(ws, 2)
    ws.close()

    state = asyncio.run(dispatch(workspace=str(root), now=START, return_state=True))
    assert state.is_completed()
    summary = state.result()
    ws = Workspace.load(root)
    failed = touch_rows(ws, touches.c.status == "failed")
    ws.close()
    assert failed and summary["failed"] == {"email": len(failed)} and summary["sent"] == {"email": 2 - len(failed)}
    reasons = [f"touch {t.idempotency_key}: TerminalError: sandbox: simulated permanent rejection of {t.idempotency_key}" for t in failed]
    assert sorted(summary["errors"]) == sorted(reasons)

    run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # logs reach the API in the background
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dispatch-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    assert f"| failed (email) | {len(failed)} |" in artifact.data and "## Errors" in artifact.data
    assert all(f"- {reason}" in artifact.data for reason in reasons)
    warnings = [log.message for log in logs if log.level >= 30]
    assert sorted(warnings) == sorted(reasons)

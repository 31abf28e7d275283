"""The Prefect flows under Prefect's test harness: real flow and task runs, real artifacts."""

from __future__ import annotations

import asyncio
import logging
import ssl

from pathlib import Path

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from sqlalchemy import func, select

from flows._common import TASK_OPTIONS, api_client_context, call_flow
from flows.dispatch import QuietCompletions, dispatch
from flows.enroll import enroll
from flows.ingest import ingest
from flows.report import report
from flows.retention import retention
from flows.tick import tick
from relance.store import enrollments, prospects, touches
from relance.workspace import Workspace
from tests.conftest import at, database_url, write_workspace

pytestmark = pytest.mark.prefect

CSV = (
    "email,first_name,last_name,company,phone,linkedin_url,timezone,country\n"
    "anne@alpha.example,Anne,Ädler,Alpha,+33612345001,linkedin.com/in/anne,Europe/Paris,FR\n"
    "bob@beta.example,Bob,Brown,Beta,+447911123456,https://www.linkedin.com/in/bob/,Europe/London,GB\n"
    "broken@,Carl,Crash,Gamma,,,,FR\n"
)


@pytest.fixture
def root(backend: str, tmp_path: Path) -> Path:
    root = write_workspace(tmp_path / "ws", database_url(backend, tmp_path))
    (root / "prospects.csv").write_text(CSV)
    return root


def test_enroll_dispatch_ingest_report_flows(root: Path):
    start = at("2027-03-15T07:00:00")
    result = enroll(sequence="outbound", workspace=str(root), csv_file=str(root / "prospects.csv"), now=start)
    assert result["imported"] == 2 and len(result["rejected"]) == 1 and result["enrolled"] == 2

    summary = call_flow(dispatch, workspace=str(root), now=at("2027-03-15T09:30:00"))
    assert summary["claimed"] == 2 and summary["sent"] == {"email": 2}
    assert ingest(workspace=str(root), now=at("2027-03-16T09:30:00"))["recorded"] >= 2  # delivered events
    later = asyncio.run(dispatch(workspace=str(root), now=at("2027-03-16T10:30:00")))  # Prefect's own way works too
    assert later["sent"] == {"linkedin": 2}

    out = report(workspace=str(root))
    channels = {row["channel"]: row for row in out["rows"]}
    assert channels["email"]["email_sent"] == 2 and channels["linkedin"]["linkedin_invited"] == 2

    ws = Workspace.load(root)
    with ws.store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(touches)) == 4
    ws.close()


def test_dispatch_runs_one_task_per_batch_and_channel_and_publishes_artifacts(root: Path, monkeypatch):
    from relance.enrollment import enroll as enroll_prospects
    from relance.prospects import find_prospects, import_csv

    ws = Workspace.load(root)
    import_csv(ws.store, root / "prospects.csv", now=at("2027-03-15T07:00:00"))
    with ws.store.connect() as conn:
        ids = find_prospects(conn, where={})
    enroll_prospects(ws, ws.sequence("outbound"), ids, at("2027-03-15T07:00:00"))
    ws.close()

    monkeypatch.setattr("flows.dispatch.PROGRESS_EVERY_SECONDS", 0.0)  # as if the batch took long
    state = asyncio.run(dispatch(workspace=str(root), now=at("2027-03-15T09:30:00"), return_state=True))
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
        names = [t.name for t in task_runs]
        assert names.count("send-email") == 1 and sum(n.startswith("send-") for n in names) == 1
        # One task for the batch, one per channel: never one task per message.
        assert sum(n.startswith("prepare-batch") for n in names) == 1
        ours = [a for a in client.read_artifacts() if a.flow_run_id == state.state_details.flow_run_id]
        summary = [a for a in ours if a.key == "dispatch-summary"]
        assert len(summary) == 1 and "| claimed | 2 |" in summary[0].data
        progress = [a for a in ours if a.type == "progress"]
        assert len(progress) == 1 and progress[0].data == 100.0 and "2 due" in progress[0].description

    # Routine task completions stay out of the run's log; the flow's own is there.
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    finished = [(log.task_run_id, log.message) for log in logs if log.message.startswith("Finished in state")]
    assert finished == [(None, "Finished in state Completed()")]

    # A run over within PROGRESS_EVERY_SECONDS: its summary, and no progress bar nobody saw.
    monkeypatch.undo()
    state = asyncio.run(dispatch(workspace=str(root), now=at("2027-03-16T10:30:00"), return_state=True))
    with get_client(sync_client=True) as client:
        ours = [a for a in client.read_artifacts() if a.flow_run_id == state.state_details.flow_run_id]
    assert [a.key for a in ours] == ["dispatch-summary"] and "| sent (linkedin) | 2 |" in ours[0].data


def test_retention_flow_blanks_idle_prospects_and_says_so_in_an_artifact(root: Path):
    enroll(sequence="outbound", workspace=str(root), csv_file=str(root / "prospects.csv"), now=at("2027-03-15T07:00:00"))
    config = root / "config.yaml"
    config.write_text(config.read_text() + "privacy: {retention_days: 30}\n")
    assert retention(workspace=str(root), now=at("2027-05-01T00:00:00"))["expired"] == 0  # their cadences run
    ws = Workspace.load(root)
    with ws.store.begin() as conn:
        conn.execute(enrollments.update().values(state="completed", updated_at=at("2027-03-20T00:00:00")))
    ws.close()
    preview = retention(workspace=str(root), now=at("2027-05-01T00:00:00"), dry_run=True)
    assert preview == {"retention_days": 30, "cutoff": "2027-04-01T00:00:00+00:00", "expired": 2, "dry_run": True}
    state = retention(workspace=str(root), now=at("2027-05-01T00:00:00"), return_state=True)
    assert state.result()["expired"] == 2
    with get_client(sync_client=True) as client:
        ours = [a for a in client.read_artifacts() if a.flow_run_id == state.state_details.flow_run_id]
    assert [a.key for a in ours] == ["retention"] and "2 prospect(s) idle since 2027-04-01 (30 days): personal data blanked" in ours[0].data
    ws = Workspace.load(root)
    with ws.store.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(prospects).where(prospects.c.email.is_not(None))) == 0
    ws.close()


def test_the_serve_scheduler_runs_the_async_dispatch_flow(root: Path, caplog):
    """`relance serve` fires the flows from APScheduler's threads: the async dispatch flow
    is run to completion there, not left as an unawaited coroutine."""
    from relance.serve import build_scheduler

    scheduler, ws = build_scheduler(root)
    ws.close()
    with caplog.at_level(logging.INFO, logger="relance.serve"):
        scheduler.get_job("dispatch").func()
    assert [r.getMessage() for r in caplog.records if r.name == "relance.serve"] == ["dispatch: nothing to do"]


def test_flows_called_from_sync_code_build_no_tls_context_per_run(root: Path, monkeypatch):
    """`relance serve` and the simulated clock fire flows all day: Prefect's engine built two
    API clients per run, each loading the CA bundle (70 to 80 ms apiece on a busy machine)."""
    call_flow(dispatch, workspace=str(root), now=at("2027-03-15T09:30:00"))  # the process's first run
    made = []
    create = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: made.append(1) or create(*a, **k))
    assert call_flow(dispatch, workspace=str(root), now=at("2027-03-15T10:30:00"))["claimed"] == 0
    assert call_flow(tick, workspace=str(root), now=at("2027-03-15T11:30:00"))["dispatch"]["claimed"] == 0
    assert made == []


@pytest.mark.parametrize(
    ("task_name", "level", "message", "kept"),
    [
        ("prepare-batch", logging.INFO, "Finished in state Completed()", False),
        ("send-channel", logging.INFO, "Finished in state Completed()", False),
        ("send-channel", logging.ERROR, "Finished in state Failed('Task run encountered an exception')", True),
        ("prepare-batch", logging.INFO, "Task run failed with exception: OperationalError - Retry 1/3 will start 2 second(s) from now", True),
        ("enroll-chunk", logging.INFO, "Finished in state Completed()", True),  # not a dispatch task
    ],
)
def test_only_routine_completions_of_dispatch_tasks_are_left_out_of_the_logs(task_name, level, message, kept):
    record = logging.LogRecord("prefect.task_runs", level, __file__, 1, message, None, None)
    record.task_name = task_name
    assert QuietCompletions(["prepare-batch", "send-channel"]).filter(record) is kept


@task(**TASK_OPTIONS)
def _noop() -> None:
    pass


@flow
async def _tasks_in_a_client_context(inline: int, submitted: int) -> None:
    def body() -> None:
        with api_client_context():
            futures = [_noop.submit() for _ in range(submitted)]
            for _ in range(inline):
                _noop()
            for future in futures:
                future.result()

    await asyncio.to_thread(body)


def test_every_task_of_a_dispatch_run_shares_its_one_api_client(monkeypatch):
    # Inline or in the task runner's threads: a client per task loaded the CA bundle each time.
    from prefect.client.orchestration import SyncPrefectClient

    made = []
    build = SyncPrefectClient.__init__
    monkeypatch.setattr(SyncPrefectClient, "__init__", lambda self, *a, **k: made.append(1) or build(self, *a, **k))
    asyncio.run(_tasks_in_a_client_context(1, 1))
    few = len(made)
    asyncio.run(_tasks_in_a_client_context(4, 6))
    assert len(made) == 2 * few


def test_the_dispatch_api_client_reuses_one_tls_context_as_prefect_would_build_it(monkeypatch):
    import flows._common
    from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    made = []

    class Recorder:
        def __init__(self, httpx_settings):
            made.append(httpx_settings["verify"])

        @staticmethod
        def get():  # no client context around the call
            return None

    monkeypatch.setattr(flows._common, "SyncClientContext", Recorder)
    api_client_context(), api_client_context()
    first, second = made
    assert first is second and first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        api_client_context()
    assert made[2].verify_mode == ssl.CERT_NONE

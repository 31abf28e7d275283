"""The dispatch flow: everything due, in batches, one task per batch and channel."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from flows._common import FLOW_OPTIONS, TASK_OPTIONS, api_client_context, clock, open_workspace
from relance.channels import OutboundTouch
from relance.dispatch import Batch, Dispatcher, DispatchSummary, fewer_collections
from relance.events import Channel
from relance.status import count_due
from relance.workspace import Workspace


# Each artifact call is an API round trip (~70 ms): often enough for a person watching, not
# per batch. A run over sooner gets no progress bar at all (nobody watches one that long);
# its summary artifact says what it did.
PROGRESS_EVERY_SECONDS = 5.0


class QuietCompletions(logging.Filter):
    """A dispatch over a million enrollments runs thousands of tasks: their "Finished in state
    Completed()" lines would bury the run's own log in the UI, which shows every task's state
    anyway, and each costs a console write and an API log record (a third of what a task costs
    Prefect's engine). Only those lines of our own tasks are dropped: failures, retries and
    every other message pass."""

    def __init__(self, task_names: Iterable[str]):
        super().__init__()
        self.task_names = frozenset(task_names)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.INFO
            and getattr(record, "task_name", None) in self.task_names
            and isinstance(record.msg, str)
            and record.msg.startswith("Finished in state Completed")
        )


logging.getLogger("prefect.task_runs").addFilter(QuietCompletions(["prepare-batch", "send-channel"]))


@task(name="prepare-batch", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), **TASK_OPTIONS)
def prepare_batch(dispatcher: Dispatcher, enrollment_ids: list[int], now: datetime) -> Batch:
    """Decide each claimed enrollment's touch; touches are written `sending` before any send."""
    return dispatcher.prepare(enrollment_ids, now)


@task(name="send-channel", task_run_name="send-{channel}", **TASK_OPTIONS)
def send_channel(dispatcher: Dispatcher, channel: Channel, outbound: list[OutboundTouch], now: datetime) -> DispatchSummary:
    """One connector call for the batch's touches on one channel; transient errors are
    retried per touch by the engine (backoff, Retry-After), not by re-running this task,
    which could resend what already went out."""
    return dispatcher.deliver(channel, outbound, now)


def dispatch_due(ws: Workspace, now: datetime, max_batches: int | None = None) -> DispatchSummary:
    """The body of a dispatch run: callable inside any flow (the `tick` flow reuses it).

    Sync code, also under the async `dispatch` flow: the artifact calls say `_sync=True`, or
    Prefect would hand back coroutines because the flow is async."""
    logger = get_run_logger()
    dispatcher = Dispatcher(ws)
    dispatcher.reconcile(now)
    total = DispatchSummary()
    progress: Any = None
    due = 0  # counted when the progress bar is first shown
    batches = 0
    last_update = time.monotonic()
    sending: list[Any] = []  # PostgreSQL: the previous batch's sends, still running
    with fewer_collections():
        while (max_batches is None or batches < max_batches) and (claimed := dispatcher.claim(now)):
            batches += 1
            batch = prepare_batch(quote(dispatcher), quote(claimed), now)
            total.merge(batch.summary)
            if ws.store.is_postgres:
                # Channels send side by side, and while they do the next batch is claimed and
                # prepared: PostgreSQL has no single writer, and much of a batch is waiting on it.
                for future in sending:
                    total.merge(future.result())
                sending = [send_channel.submit(quote(dispatcher), channel, quote(outbound), now) for channel, outbound in batch.outbound.items()]
            else:  # SQLite has one writer: concurrent transactions would only queue on its lock
                for channel, outbound in batch.outbound.items():
                    total.merge(send_channel(quote(dispatcher), channel, quote(outbound), now))
            if time.monotonic() - last_update >= PROGRESS_EVERY_SECONDS:
                if progress is None:  # due now, plus done already, less what is still being sent
                    due = total.claimed + count_due(ws, now) - (sum(map(len, batch.outbound.values())) if sending else 0)
                    description = f"Dispatch at {now:%Y-%m-%d %H:%M} UTC: {due} due"
                    progress = create_progress_artifact(progress=_percent(total, due), description=description, _sync=True)
                else:
                    update_progress_artifact(progress, progress=_percent(total, due), _sync=True)
                last_update = time.monotonic()
        for future in sending:
            total.merge(future.result())
    if progress is not None:
        update_progress_artifact(progress, progress=100.0, _sync=True)
    logger.info("dispatch at %s: %s", now.isoformat(), {k: v for k, v in total.as_dict().items() if k != "errors"})
    for error in total.errors[:20]:
        logger.warning(error)
    if total.claimed:
        create_markdown_artifact(markdown=_markdown(now, total.as_dict()), key="dispatch-summary", description="Last dispatch", _sync=True)
    return total


@flow(name="dispatch", **FLOW_OPTIONS)
async def dispatch(workspace: str = ".", now: datetime | None = None, max_batches: int | None = None) -> dict[str, Any]:
    """Async only at the top: Prefect joins a sync flow's heartbeat thread at exit, and that
    thread sleeps in 1 s steps, so every sync run ended with up to a second of idle wait.
    The work itself is plain sync code, in a thread of its own (Prefect's run context goes
    with it); call it with `flows._common.call_flow` from sync code."""
    return await asyncio.to_thread(_dispatch, workspace, now, max_batches)


def _dispatch(workspace: str, now: datetime | None, max_batches: int | None) -> dict[str, Any]:
    # One API client for all the run's tasks: without it, each task in this thread would
    # build its own.
    with api_client_context():
        ws = open_workspace(workspace)
        try:
            return dispatch_due(ws, clock(now), max_batches).as_dict()
        finally:
            ws.close()


def _percent(total: DispatchSummary, due: int) -> float:
    return min(100.0, 100.0 * total.claimed / max(due, 1))


def _markdown(now: datetime, summary: dict[str, Any]) -> str:
    lines = [f"# Dispatch at {now:%Y-%m-%d %H:%M} UTC", "", "| what | count |", "|---|---|"]
    for key in ("claimed", "skipped", "deferred", "paused", "exited", "completed"):
        lines.append(f"| {key} | {summary[key]} |")
    for key in ("sent", "tasks", "retried", "failed"):
        for channel, count in sorted(summary[key].items()):
            lines.append(f"| {key} ({channel}) | {count} |")
    if summary["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in summary["errors"]]
    return "\n".join(lines)

"""The dispatch flow: everything due, in batches, one task per batch and channel."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff

from flows._common import TASK_OPTIONS, clock, open_workspace
from relance.channels import OutboundTouch
from relance.dispatch import Batch, Dispatcher, DispatchSummary
from relance.events import Channel
from relance.status import count_due


@task(name="reconcile", **TASK_OPTIONS)
def reconcile(dispatcher: Dispatcher, now: datetime) -> int:
    return dispatcher.reconcile(now)


@task(name="prepare-batch", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), **TASK_OPTIONS)
def prepare_batch(dispatcher: Dispatcher, now: datetime) -> Batch:
    """Claim a batch (leased) and decide each enrollment's touch."""
    return dispatcher.prepare(dispatcher.claim(now), now)


@task(name="send-channel", task_run_name="send-{channel}", **TASK_OPTIONS)
def send_channel(dispatcher: Dispatcher, channel: Channel, outbound: list[OutboundTouch], now: datetime) -> DispatchSummary:
    """One connector call for the batch's touches on one channel; transient errors are
    retried per touch by the engine (backoff, Retry-After), not by re-running this task,
    which could resend what already went out."""
    return dispatcher.deliver(channel, outbound, now)


@flow(name="dispatch", log_prints=False)
def dispatch(workspace: str = ".", now: datetime | None = None, max_batches: int | None = None) -> dict[str, Any]:
    now = clock(now)
    logger = get_run_logger()
    ws = open_workspace(workspace)
    try:
        dispatcher = Dispatcher(ws)
        reconcile(dispatcher, now)
        due = count_due(ws, now)
        total = DispatchSummary()
        if not due:
            return total.as_dict()
        progress = create_progress_artifact(progress=0.0, description=f"Dispatch at {now:%Y-%m-%d %H:%M} UTC: {due} due")
        batches = 0
        while max_batches is None or batches < max_batches:
            batch = prepare_batch(dispatcher, now)
            if batch.summary.claimed == 0:
                break
            batches += 1
            total.merge(batch.summary)
            futures = [send_channel.submit(dispatcher, channel, outbound, now) for channel, outbound in batch.outbound.items()]
            for future in futures:
                total.merge(future.result())
            update_progress_artifact(progress, progress=min(100.0, 100.0 * total.claimed / max(due, 1)))
        update_progress_artifact(progress, progress=100.0)
        summary = total.as_dict()
        logger.info("dispatch at %s: %s", now.isoformat(), {k: v for k, v in summary.items() if k != "errors"})
        for error in total.errors[:20]:
            logger.warning(error)
        if total.claimed:
            create_markdown_artifact(markdown=_markdown(now, summary), key="dispatch-summary", description="Last dispatch")
        return summary
    finally:
        ws.close()


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

"""The naive design DESIGN.md section 9 compares against: one Prefect task per touch, which
renders, inserts its touch row in its own transaction and appends the touch to a file.

Imported only after PREFECT_HOME points at the bench's temporary directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import prefect.runtime.flow_run
from prefect import flow, task
from prefect.utilities.annotations import quote
from sqlalchemy import insert

from flows._common import TASK_OPTIONS
from flows.dispatch import QuietCompletions
from relance.store import touches

# Logged as the dispatch flow's own tasks are: without their routine completion lines.
logging.getLogger("prefect.task_runs").addFilter(QuietCompletions(["naive-touch"]))


@task(name="naive-touch", **TASK_OPTIONS)
def naive_touch(engine: Any, templates: tuple[Any, Any], ctx: dict[str, Any], row: dict[str, Any], outbox: str) -> None:
    subject_tpl, body_tpl = templates
    subject = subject_tpl.render(ctx) if subject_tpl is not None else None
    body = body_tpl.render(ctx)
    with engine.begin() as conn:
        conn.execute(insert(touches), {**row, "subject": subject})
    with open(outbox, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"key": row["idempotency_key"], "recipient": row["recipient"], "subject": subject, "body": body}) + "\n")


_WORK: dict[str, Any] = {}  # handed to the flow out of band: an engine is not a flow parameter


@flow(name="naive-dispatch")
def naive_dispatch(outbox: str) -> tuple[float, str]:
    """Seconds for the loop only: the flow's own start-up is not charged to the naive design."""
    engine, work = _WORK["engine"], _WORK["work"]
    start = time.perf_counter()
    for templates, ctx, row in work:
        naive_touch(quote(engine), quote(templates), quote(ctx), quote(row), outbox)
    return time.perf_counter() - start, str(prefect.runtime.flow_run.id)


def run(engine: Any, work: list[Any], outbox: Path) -> tuple[float, str]:
    """The loop's seconds, and the flow run's id."""
    _WORK.update(engine=engine, work=work)
    try:
        return naive_dispatch(str(outbox))
    finally:
        _WORK.clear()


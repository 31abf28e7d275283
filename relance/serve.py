"""Single-machine mode: APScheduler fires the Prefect flows on the configured schedules,
next to the web app, so nothing but Python is needed (no Prefect server, no worker)."""

from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path

from relance.workspace import Workspace

log = logging.getLogger("relance.serve")


def build_scheduler(root: Path):
    """A BackgroundScheduler with one job per flow; each job runs the real flow."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    from flows._common import call_flow
    from flows.dispatch import dispatch
    from flows.ingest import ingest
    from flows.report import report
    from flows.retention import retention

    ws = Workspace.load(root)
    schedules = ws.config.schedules
    zone = ws.config.timezone
    path = str(root)
    scheduler = BackgroundScheduler(timezone=zone, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300})
    for name, flow, cron in (
        ("dispatch", dispatch, schedules.dispatch_cron),
        ("ingest", ingest, schedules.ingest_cron),
        ("report", report, schedules.report_cron),
        ("retention", retention, schedules.retention_cron),
    ):
        scheduler.add_job(_logged(name, partial(call_flow, flow), path), CronTrigger.from_crontab(cron, timezone=zone), id=name)
    return scheduler, ws


def _logged(name: str, run, path: str):
    """Run a flow and say what it did: `relance serve` is watched in a terminal too."""

    def job() -> None:
        try:
            result = run(workspace=path)
        except Exception:  # the next tick runs anyway; the flow run itself is Failed in Prefect
            log.exception("%s failed", name)
            return
        if name != "report":
            did = {k: v for k, v in result.items() if v and k != "errors"}
            log.info("%s: %s", name, did or "nothing to do")

    return job


def serve(root: Path, *, with_web: bool = True) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    scheduler, ws = build_scheduler(root)
    scheduler.start()
    log.info("scheduler started: %s", [j.id for j in scheduler.get_jobs()])
    try:
        if with_web:
            import uvicorn

            from relance.web import create_app

            uvicorn.run(create_app(ws), host=ws.config.web.host, port=ws.config.web.port)
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        scheduler.shutdown(wait=False)
        ws.close()

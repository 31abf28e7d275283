"""Single-machine mode: APScheduler fires the Prefect flows on the configured schedules,
next to the web app, so nothing but Python is needed (no Prefect server, no worker)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from relance.workspace import Workspace

log = logging.getLogger("relance.serve")


def build_scheduler(root: Path):
    """A BackgroundScheduler with one job per flow; each job runs the real flow."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    from flows.dispatch import dispatch
    from flows.ingest import ingest
    from flows.report import report

    ws = Workspace.load(root)
    schedules = ws.config.schedules
    zone = ws.config.timezone
    path = str(root)
    scheduler = BackgroundScheduler(timezone=zone, job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300})
    scheduler.add_job(lambda: dispatch(workspace=path), CronTrigger.from_crontab(schedules.dispatch_cron, timezone=zone), id="dispatch")
    scheduler.add_job(lambda: ingest(workspace=path), CronTrigger.from_crontab(schedules.ingest_cron, timezone=zone), id="ingest")
    scheduler.add_job(lambda: report(workspace=path), CronTrigger.from_crontab(schedules.report_cron, timezone=zone), id="report")
    return scheduler, ws


def serve(root: Path, *, with_web: bool = True) -> None:
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

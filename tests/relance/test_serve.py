"""`relance serve`: APScheduler fires the real flows on the configured schedules."""

from datetime import datetime
from zoneinfo import ZoneInfo

from relance.serve import build_scheduler


def test_scheduler_has_the_four_flows_on_their_cron_schedules(example_workspace):
    scheduler, ws = build_scheduler(example_workspace)
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {"dispatch", "ingest", "report", "retention"}
        paris = ZoneInfo(ws.config.timezone)
        start = datetime(2027, 3, 15, 8, 0, 30, tzinfo=paris)
        fire = {name: job.trigger.get_next_fire_time(None, start) for name, job in jobs.items()}
        assert fire["dispatch"] == datetime(2027, 3, 15, 8, 1, tzinfo=paris)  # every minute
        assert fire["ingest"] == datetime(2027, 3, 15, 8, 5, tzinfo=paris)  # every five minutes
        assert fire["report"] == datetime(2027, 3, 16, 7, 0, tzinfo=paris)  # daily at 07:00
        assert fire["retention"] == datetime(2027, 3, 16, 3, 30, tzinfo=paris)  # nightly
    finally:
        ws.close()

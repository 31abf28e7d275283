"""A simulated clock for the demo: the scheduler's ticks, minus the idle ones.

`relance serve` dispatches every minute; simulating weeks that way would be thousands of
flow runs doing nothing. Here the clock jumps to the next due touch, rounded up to the
scheduler's interval, so every tick has work and none is skipped that has work.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from relance.events import TASK_OUTCOMES
from relance.inbox import complete_task, open_tasks
from relance.planning import stable_fraction
from relance.status import next_due
from relance.workspace import Workspace

# What a simulated SDR records on the tasks it closes, by channel: (outcome, share).
TASK_OUTCOME_SHARES = {
    "call": [("connected", 0.25), ("voicemail", 0.40), ("no_answer", 0.30), ("wrong_number", 0.05)],
    "linkedin": [("done", 0.65), ("accepted", 0.35)],
    "task": [("done", 1.0)],
}


class Simulation:
    def __init__(self, ws: Workspace, start: datetime, end: datetime, step: timedelta, *, close_tasks: bool = True):
        self.ws, self.start, self.end, self.step = ws, start, end, step
        self.close_tasks = close_tasks
        self.tick_count = 0
        self.sent: Counter[str] = Counter()
        self.tasks_created = 0
        self.tasks_closed = 0

    @property
    def span_seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def ticks(self) -> Iterator[datetime]:
        now = self.start
        while now < self.end:
            self.tick_count += 1
            yield now
            if self.close_tasks:
                self._close_tasks(now)
            upcoming = next_due(self.ws)
            if upcoming is None:
                return
            now = max(now + self.step, self._round_up(upcoming))

    def record(self, now: datetime, summary: dict[str, Any]) -> None:
        self.sent.update(summary.get("sent", {}))
        self.tasks_created += sum(summary.get("tasks", {}).values())

    def _round_up(self, at: datetime) -> datetime:
        step = self.step.total_seconds()
        offset = (at - self.start).total_seconds()
        return self.start + timedelta(seconds=-(-offset // step) * step)

    def _close_tasks(self, now: datetime) -> None:
        for task in open_tasks(self.ws, now, limit=10_000):
            shares = TASK_OUTCOME_SHARES.get(task["channel"], [("done", 1.0)])
            point = stable_fraction("task", task["id"])
            outcome = shares[-1][0]
            for name, share in shares:
                point -= share
                if point < 0:
                    outcome = name
                    break
            if task["channel"] == "linkedin" and task["action"] != "invite" and outcome == "accepted":
                outcome = "done"
            assert outcome in TASK_OUTCOMES
            complete_task(self.ws, task["id"], outcome, now)
            self.tasks_closed += 1

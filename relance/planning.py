"""Where an enrollment goes next: its calendar, its next step, its sender, its variant.

Pure functions of the spec, the prospect and `now`, shared by enroll, dispatch and preview,
so that `relance preview` shows exactly what dispatch will do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence as Seq
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from relance.calendar import BusinessCalendar, zone_for
from relance.config import Config
from relance.spec import Schedule, Sequence, Step, Variant, Window


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) that depends only on `parts`: the same across runs and machines."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@lru_cache(maxsize=1)
def _holiday_countries() -> frozenset[str]:
    import holidays

    return frozenset(holidays.list_supported_countries())


# Keyed by the window's identity: hashing a pydantic model for every touch costs more than
# the calendar lookup itself. The window is kept in the value so its id cannot be reused.
_CALENDARS: dict[tuple[int, str, str | None], tuple[Window, BusinessCalendar]] = {}


def _calendar(window: Window, zone_name: str, country: str | None) -> BusinessCalendar:
    key = (id(window), zone_name, country)
    entry = _CALENDARS.get(key)
    if entry is None or entry[0] is not window:
        if len(_CALENDARS) >= 4096:
            _CALENDARS.clear()
        entry = _CALENDARS[key] = (window, BusinessCalendar(window, ZoneInfo(zone_name), country))
    return entry[1]


# (schedule, config, the prospect's timezone and country) -> calendar: two lookups per touch.
_CALENDAR_FOR: dict[tuple[int, int, Any, Any], tuple[Schedule, Config, BusinessCalendar]] = {}


def calendar_for(schedule: Schedule, prospect: Mapping[str, Any], config: Config) -> BusinessCalendar:
    """The prospect's zone (else the config's) and the holiday country the schedule names."""
    key = (id(schedule), id(config), prospect.get("timezone"), prospect.get("country"))
    entry = _CALENDAR_FOR.get(key)
    if entry is None or entry[0] is not schedule or entry[1] is not config:
        if len(_CALENDAR_FOR) >= 4096:
            _CALENDAR_FOR.clear()
        entry = _CALENDAR_FOR[key] = (schedule, config, _calendar_for(schedule, prospect, config))
    return entry[2]


def _calendar_for(schedule: Schedule, prospect: Mapping[str, Any], config: Config) -> BusinessCalendar:
    if schedule.timezone == "prospect":
        zone = zone_for(prospect.get("timezone"), config.timezone).key
    else:
        zone = schedule.timezone
    if schedule.holidays == "prospect":
        # A country the holidays package does not know falls back to the workspace's, never to none.
        country = (prospect.get("country") or "").upper()
        country = country if country in _holiday_countries() else config.country
    else:
        country = schedule.holidays
    return _calendar(schedule.window, zone, country)


def due_at(seq: Sequence, step: Step | None, prospect: Mapping[str, Any], config: Config, start: datetime) -> datetime:
    """When `step` falls due after `start` (or the next opening, for no step), inside the
    window, jittered per prospect and step so a thousand prospects do not fire at 09:00:00."""
    cal = calendar_for(seq.schedule, prospect, config)
    key = f"{prospect['id']}:{seq.name}:{step.id if step else ''}"
    return cal.due_time(start, step.wait if step else None, key, seq.schedule.jitter_minutes)


def step_after(seq: Sequence, done: Seq[str], current: str | None) -> Step | None:
    """The step to run next. `current` is the stored next step id; if the file no longer has
    it, resume at the first step after the last one this enrollment ran (removing a step
    skips it)."""
    if current is not None and (step := seq.step(current)) is not None:
        return step
    positions = [i for i in (seq.index_of(s) for s in done) if i is not None]
    start = max(positions) + 1 if positions else 0
    done_set = set(done)
    for step in seq.steps[start:]:
        if step.id not in done_set:
            return step
    return None


def following(seq: Sequence, step_id: str) -> Step | None:
    index = seq.index_of(step_id)
    if index is None or index + 1 >= len(seq.steps):
        return None
    return seq.steps[index + 1]


def pick_sender(config: Config, pool: str, prospect_key: str) -> str | None:
    """A mailbox of the pool chosen by the prospect, so the same prospect always gets the same one."""
    boxes = config.senders.get(pool) or []
    if not boxes:
        return None
    return boxes[int(stable_fraction("sender", pool, prospect_key) * len(boxes))].email


def pick_variant(variants: Seq[Variant], seq_name: str, step_id: str, prospect_id: int) -> Variant | None:
    """Weighted, deterministic: a prospect sees the same variant on every run and every worker."""
    if not variants:
        return None
    total = sum(v.weight for v in variants)
    point = stable_fraction("variant", seq_name, step_id, prospect_id) * total
    for variant in variants:
        point -= variant.weight
        if point < 0:
            return variant
    return variants[-1]


def touch_context(
    config: Config, seq: Sequence, step: Step, prospect: Mapping[str, Any], sender: Mapping[str, str], unsubscribe_url: str | None
) -> dict[str, Any]:
    """The variables a template sees; validate, preview and dispatch all render with this.

    The parts that are the same for every prospect are built once and shared, and a plain
    dict of the prospect is used as it is: templates run in an immutable sandbox, so none can
    change them for the next one."""
    return {
        "prospect": prospect if type(prospect) is dict else dict(prospect),
        "sender": _shared(sender, lambda s: {"name": s.get("name", ""), "email": s.get("email", ""), "signature": s.get("signature", "")}),
        "company": _shared(config.company, lambda c: c.model_dump()),
        "unsubscribe_url": unsubscribe_url,
        "sequence": _shared(seq, lambda q: {"name": q.name, "description": q.description, "owner": q.owner, "language": q.language, "kind": q.kind}),
        "step": _shared(step, lambda t: {"id": t.id, "channel": t.channel.value, "action": t.action}),
    }


_SHARED: dict[int, tuple[Any, dict[str, Any]]] = {}


def _shared(model: Any, build: Any) -> dict[str, Any]:
    """`build(model)`, kept per model object (by identity, the object kept so its id cannot be reused)."""
    entry = _SHARED.get(id(model))
    if entry is None or entry[0] is not model:
        if len(_SHARED) >= 4096:
            _SHARED.clear()
        entry = _SHARED[id(model)] = (model, build(model))
    return entry[1]


def step_templates(step: Step, variant: Variant | None) -> tuple[str | None, str | None]:
    """(template file, subject override) a step renders; a variant's own values win."""
    if step.email:
        template = (variant.template if variant and variant.template else None) or step.email.template
        subject = (variant.subject if variant and variant.subject else None) or step.email.subject
        return template, subject
    if step.linkedin:
        return step.linkedin.template, None
    if step.call:
        return step.call.script, None
    return (step.task.template if step.task else None), None


def reply_subject(subject: str | None) -> str | None:
    """The subject of a follow-up threaded on an earlier email."""
    if not subject:
        return None
    return subject if subject.lower().startswith(("re:", "re :")) else f"Re: {subject}"

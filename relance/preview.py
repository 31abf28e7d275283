"""The exact timeline of one prospect through a cadence, computed by the same planning
functions dispatch uses, rendered, in the prospect's local time. Nothing is written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relance.conditions import evaluate
from relance.errors import RelanceError
from relance.planning import calendar_for, due_at, pick_sender, pick_variant, reply_subject, step_templates, touch_context
from relance.spec import Sequence
from relance.workspace import Workspace


@dataclass
class PlannedTouch:
    step_id: str
    channel: str
    action: str
    at_utc: datetime
    at_local: datetime
    variant: str | None
    subject: str | None
    body: str
    skipped: str | None = None


def timeline(
    ws: Workspace, seq: Sequence, prospect: Mapping[str, Any], start: datetime, assume: Iterable[tuple[str, str | None]] = ()
) -> list[PlannedTouch]:
    """Every step in order. `assume` adds (kind, step) events, e.g. ('accepted', 'invite')."""
    seen = list(assume)
    cal = calendar_for(seq.schedule, prospect, ws.config)
    sender_address = pick_sender(ws.config, seq.sender.pool, prospect.get("email") or str(prospect["id"])) if seq.sender else None
    box = ws.config.mailbox(sender_address) if sender_address else None
    sender = {"name": box.name if box else "", "email": sender_address or "", "signature": box.signature if box else ""}
    unsubscribe_url = f"{ws.config.web.base_url.rstrip('/')}/u/PREVIEW"
    out: list[PlannedTouch] = []
    at = start
    subjects: dict[str, str | None] = {}
    for step in seq.steps:
        at = due_at(seq, step, prospect, ws.config, at)
        local = at.astimezone(cal.zone)
        variant = pick_variant(step.email.variants, seq.name, step.id, prospect["id"]) if step.email else None
        if step.when and not evaluate(step.when, prospect, seen):
            out.append(PlannedTouch(step.id, step.channel.value, step.action, at, local, None, None, "", skipped=f"when: {step.when}"))
            continue
        template, subject_override = step_templates(step, variant)
        try:
            context = touch_context(ws.config, seq, step, prospect, sender, unsubscribe_url)
            rendered = ws.renderer.render(template, context, subject_override) if template else None
            subject = rendered.subject if rendered else (step.task.title if step.task else None)
            if step.email and step.email.reply_to and not subject:
                subject = reply_subject(subjects.get(step.email.reply_to))
            body = rendered.body if rendered else ""
        except RelanceError as exc:
            subject, body = None, f"[cannot render: {exc}]"
        subjects[step.id] = subject
        seen.append(("sent", step.id))
        out.append(PlannedTouch(step.id, step.channel.value, step.action, at, local, variant.id if variant else None, subject, body))
    return out

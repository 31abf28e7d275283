"""Normalised event kinds, in the manner of django-anymail's tracking events."""

from __future__ import annotations

from enum import StrEnum


class EventKind(StrEnum):
    # email
    queued = "queued"
    sent = "sent"
    delivered = "delivered"
    opened = "opened"
    clicked = "clicked"
    replied = "replied"
    auto_replied = "auto_replied"
    bounced = "bounced"
    complained = "complained"
    unsubscribed = "unsubscribed"
    # linkedin
    visited = "visited"
    invited = "invited"
    accepted = "accepted"
    messaged = "messaged"
    # call
    call_connected = "call_connected"
    call_voicemail = "call_voicemail"
    call_no_answer = "call_no_answer"
    call_wrong_number = "call_wrong_number"
    # outcomes
    meeting_booked = "meeting_booked"
    qualified = "qualified"
    disqualified = "disqualified"
    # manual work
    task_done = "task_done"
    task_skipped = "task_skipped"
    # engine bookkeeping
    failed = "failed"
    completed = "completed"


class Channel(StrEnum):
    email = "email"
    linkedin = "linkedin"
    call = "call"
    task = "task"


# These end every cadence of the prospect and suppress the address, whatever exit_on says.
SUPPRESSING_KINDS = frozenset({EventKind.unsubscribed, EventKind.complained})

# The outcome an SDR records on a call or LinkedIn task, mapped to the event it becomes.
TASK_OUTCOMES: dict[str, EventKind] = {
    "connected": EventKind.call_connected,
    "voicemail": EventKind.call_voicemail,
    "no_answer": EventKind.call_no_answer,
    "wrong_number": EventKind.call_wrong_number,
    "meeting_booked": EventKind.meeting_booked,
    "accepted": EventKind.accepted,
    "replied": EventKind.replied,
    "qualified": EventKind.qualified,
    "disqualified": EventKind.disqualified,
    "unsubscribed": EventKind.unsubscribed,
    "done": EventKind.task_done,
    "skipped": EventKind.task_skipped,
}

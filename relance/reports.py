"""Reports over the event log, aggregated in SQL.

The event log reaches millions of rows, so nothing here loads events into Python. One
statement counts distinct touches per (sequence, step, variant, sender, channel, kind), the
finest grain any report needs; Python rolls that up to the dimension asked for. Its size
depends on how many steps, variants and senders exist, never on how many events, and a
single covering index can serve it in order, with no sort, for every dimension.

Responses count distinct touches, so an email opened five times is one open. Counts are
activity in the period: a reply inside [since, until) counts even when its email went out
before `since`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

from sqlalchemy import distinct, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement, UnaryExpression

from relance.events import Channel, EventKind
from relance.store import events

if TYPE_CHECKING:
    from rich.table import Table

Dimension = Literal["channel", "step", "sequence", "variant", "sender"]

NONE_KEY = "(none)"  # a group whose key is NULL, e.g. meetings and completions without a channel
NO_RATE = "–"


# ---------------------------------------------------------------------------- metric specs


@dataclass(frozen=True, slots=True)
class Count:
    """A reported count: distinct touches with an event of `kind` on `channel` (None: any)."""

    key: str
    kind: str
    channel: str | None = None
    detail: str | None = None  # only "hard" and "soft", of bounces, are counted apart


@dataclass(frozen=True, slots=True)
class Rate:
    """numerator / sum(denominator); None when the denominator is zero, never a ZeroDivisionError."""

    key: str
    numerator: str
    denominator: tuple[str, ...]
    basis: str  # what the rate is a share of, for readers: "of sent"


@dataclass(frozen=True, slots=True)
class Column:
    """A displayed metric: a count and the rate that goes with it, if any."""

    count: str
    label: str
    rate: str | None = None
    short: str | None = None  # header in terminal tables, where a dozen columns must fit


@dataclass(frozen=True, slots=True)
class Section:
    """One table of the printed report: a channel and only the metrics that make sense for it."""

    name: str
    title: str
    columns: tuple[Column, ...]


K = EventKind

def _counts(channel: Channel, pairs: Sequence[tuple[str, K, str | None]]) -> list[Count]:
    return [Count(f"{channel}_{name}", str(kind), str(channel), detail) for name, kind, detail in pairs]


COUNTS: tuple[Count, ...] = (
    *_counts(
        Channel.email,
        [
            ("sent", K.sent, None),
            ("delivered", K.delivered, None),
            ("opened", K.opened, None),
            ("clicked", K.clicked, None),
            ("replied", K.replied, None),
            ("auto_replied", K.auto_replied, None),
            ("bounced", K.bounced, None),
            ("bounced_hard", K.bounced, "hard"),
            ("bounced_soft", K.bounced, "soft"),
            ("complained", K.complained, None),
            ("unsubscribed", K.unsubscribed, None),
            ("meetings", K.meeting_booked, None),
            ("failed", K.failed, None),
        ],
    ),
    *_counts(
        Channel.linkedin,
        [
            ("visited", K.visited, None),
            ("invited", K.invited, None),
            ("accepted", K.accepted, None),
            ("messaged", K.messaged, None),
            ("replied", K.replied, None),
            ("meetings", K.meeting_booked, None),
            ("failed", K.failed, None),
        ],
    ),
    *_counts(
        Channel.call,
        [
            ("attempted", K.sent, None),
            ("connected", K.call_connected, None),
            ("voicemail", K.call_voicemail, None),
            ("no_answer", K.call_no_answer, None),
            ("wrong_number", K.call_wrong_number, None),
            ("meetings", K.meeting_booked, None),
            ("failed", K.failed, None),
        ],
    ),
    Count("meetings", str(K.meeting_booked)),
    Count("failed", str(K.failed)),
    Count("completed", str(K.completed)),
)

RATES: tuple[Rate, ...] = (
    Rate("email_delivery_rate", "email_delivered", ("email_sent",), "of sent"),
    Rate("email_open_rate", "email_opened", ("email_delivered",), "of delivered"),
    Rate("email_click_rate", "email_clicked", ("email_delivered",), "of delivered"),
    Rate("email_reply_rate", "email_replied", ("email_sent",), "of sent"),
    Rate("email_bounce_rate", "email_bounced", ("email_sent",), "of sent"),
    Rate("email_complaint_rate", "email_complained", ("email_delivered",), "of delivered"),
    Rate("email_unsubscribe_rate", "email_unsubscribed", ("email_delivered",), "of delivered"),
    Rate("email_meeting_rate", "email_meetings", ("email_sent",), "of sent"),
    Rate("linkedin_acceptance_rate", "linkedin_accepted", ("linkedin_invited",), "of invited"),
    Rate("linkedin_reply_rate", "linkedin_replied", ("linkedin_messaged",), "of messaged"),
    # A visit does not reach the person; an invitation note or a message does.
    Rate(
        "linkedin_meeting_rate",
        "linkedin_meetings",
        ("linkedin_invited", "linkedin_messaged"),
        "of invited + messaged",
    ),
    Rate("call_connect_rate", "call_connected", ("call_attempted",), "of attempted"),
    Rate("call_meeting_rate", "call_meetings", ("call_attempted",), "of attempted"),
)

SECTIONS: tuple[Section, ...] = (
    Section(
        "email",
        "Email",
        (
            Column("email_sent", "Sent"),
            Column("email_delivered", "Delivered", "email_delivery_rate"),
            Column("email_opened", "Opened", "email_open_rate"),
            Column("email_clicked", "Clicked", "email_click_rate"),
            Column("email_replied", "Replied", "email_reply_rate"),
            Column("email_auto_replied", "Auto-replied", short="Auto"),
            Column("email_bounced", "Bounced", "email_bounce_rate"),
            Column("email_bounced_hard", "Hard bounces", short="Hard"),
            Column("email_bounced_soft", "Soft bounces", short="Soft"),
            Column("email_complained", "Complaints", "email_complaint_rate"),
            Column("email_unsubscribed", "Unsubscribed", "email_unsubscribe_rate", short="Unsub"),
            Column("email_meetings", "Meetings", "email_meeting_rate"),
            Column("email_failed", "Failed"),
        ),
    ),
    Section(
        "linkedin",
        "LinkedIn",
        (
            Column("linkedin_visited", "Visited"),
            Column("linkedin_invited", "Invited"),
            Column("linkedin_accepted", "Accepted", "linkedin_acceptance_rate"),
            Column("linkedin_messaged", "Messaged"),
            Column("linkedin_replied", "Replied", "linkedin_reply_rate"),
            Column("linkedin_meetings", "Meetings", "linkedin_meeting_rate"),
            Column("linkedin_failed", "Failed"),
        ),
    ),
    Section(
        "call",
        "Call",
        (
            Column("call_attempted", "Attempted"),
            Column("call_connected", "Connected", "call_connect_rate"),
            Column("call_voicemail", "Voicemail"),
            Column("call_no_answer", "No answer"),
            Column("call_wrong_number", "Wrong number"),
            Column("call_meetings", "Meetings", "call_meeting_rate"),
            Column("call_failed", "Failed"),
        ),
    ),
    Section(
        "all",
        "All channels",
        (
            Column("meetings", "Meetings"),
            Column("failed", "Failed"),
            Column("completed", "Completed"),
        ),
    ),
)

DELIVERABILITY_COUNTS: tuple[Count, ...] = tuple(
    Count(key, str(kind), str(Channel.email), detail)
    for key, kind, detail in [
        ("sent", K.sent, None),
        ("delivered", K.delivered, None),
        ("bounced", K.bounced, None),  # every bounce, also one a provider did not classify
        ("bounced_hard", K.bounced, "hard"),
        ("bounced_soft", K.bounced, "soft"),
        ("complained", K.complained, None),
        ("unsubscribed", K.unsubscribed, None),
        ("auto_replied", K.auto_replied, None),
        ("replied", K.replied, None),
    ]
)

DELIVERABILITY_RATES: tuple[Rate, ...] = (
    Rate("delivery_rate", "delivered", ("sent",), "of sent"),
    Rate("bounce_rate", "bounced", ("sent",), "of sent"),
    Rate("hard_bounce_rate", "bounced_hard", ("sent",), "of sent"),
    Rate("soft_bounce_rate", "bounced_soft", ("sent",), "of sent"),
    Rate("complaint_rate", "complained", ("delivered",), "of delivered"),
    Rate("unsubscribe_rate", "unsubscribed", ("delivered",), "of delivered"),
    Rate("auto_reply_rate", "auto_replied", ("sent",), "of sent"),
    Rate("reply_rate", "replied", ("sent",), "of sent"),
)

DELIVERABILITY_SECTIONS: tuple[Section, ...] = (
    Section(
        "deliverability",
        "Email deliverability",
        (
            Column("sent", "Sent"),
            Column("delivered", "Delivered", "delivery_rate"),
            Column("bounced", "Bounces", "bounce_rate"),
            Column("bounced_hard", "Hard bounces", "hard_bounce_rate"),
            Column("bounced_soft", "Soft bounces", "soft_bounce_rate"),
            Column("complained", "Complaints", "complaint_rate"),
            Column("unsubscribed", "Opt-outs", "unsubscribe_rate"),
            Column("auto_replied", "Auto-replies", "auto_reply_rate"),
            Column("replied", "Replies", "reply_rate"),
        ),
    ),
)

# Step and variant ids are only unique within their sequence (and step), so they group with it.
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "channel": ("channel",),
    "step": ("sequence", "step"),
    "sequence": ("sequence",),
    "variant": ("sequence", "step", "variant"),
    "sender": ("sender",),
}
# The grain of the one aggregate statement, in the order of the index that serves it.
GRAIN = {
    "sequence": events.c.sequence,
    "step": events.c.step_id,
    "variant": events.c.variant,
    "sender": events.c.sender,
    "channel": events.c.channel,
    "kind": events.c.kind,
}
KEY_LABELS = {"channel": "Channel", "sequence": "Sequence", "step": "Step", "variant": "Variant", "sender": "Sender"}


# ---------------------------------------------------------------------------- the report


def _fmt_rate(value: float | None) -> str:
    return NO_RATE if value is None else f"{value * 100:.1f}%"


def _rate_label(key: str) -> str:
    """email_open_rate -> Open rate: the channel is the section's title already."""
    for channel in Channel:
        key = key.removeprefix(f"{channel}_")
    return key.replace("_", " ").capitalize()


def _fmt_key(value: Any) -> str:
    return NONE_KEY if value is None else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


@dataclass
class Report:
    """The aggregated rows, plus the layout to print them one channel per table."""

    dimension: str
    keys: tuple[str, ...]
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    filters: dict[str, Any]
    sections: tuple[Section, ...] = field(default=SECTIONS, repr=False)
    rates: tuple[Rate, ...] = field(default=RATES, repr=False)
    title: str = "Relance report"
    view: str = "funnel"  # `relance report --view`: funnel (per channel) or deliverability

    # -- machine formats

    @property
    def metric_keys(self) -> list[str]:
        return list(self.totals)  # counts, then rates

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "view": self.view,
            "dimension": self.dimension,
            "keys": list(self.keys),
            "filters": self.filters,
            "rows": self.rows,
            "totals": self.totals,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default, ensure_ascii=False)

    def to_csv(self) -> str:
        """Group rows, then a TOTAL row; NULL keys and undefined rates are empty cells."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        metrics = self.metric_keys
        writer.writerow([*self.keys, *metrics])
        for row in self.rows:
            writer.writerow([*("" if row[k] is None else row[k] for k in self.keys), *(_csv(row[m]) for m in metrics)])
        total_keys = ["TOTAL", *[""] * (len(self.keys) - 1)]
        writer.writerow([*total_keys, *(_csv(self.totals[m]) for m in metrics)])
        return out.getvalue()

    # -- human formats

    def active_sections(self) -> list[Section]:
        """The sections with any activity, so an email-only cadence prints no empty call table."""
        active = [s for s in self.sections if any(self.totals[c.count] for c in s.columns)]
        return active or list(self.sections)

    def _section_rows(self, section: Section) -> list[dict[str, Any]]:
        return [r for r in self.rows if any(r[c.count] for c in section.columns)]

    def _basis(self, rate_key: str) -> str:
        return next(r.basis for r in self.rates if r.key == rate_key)

    def _vertical(self) -> bool:
        # By channel, each channel table has one group: list its metrics down, not across.
        return self.dimension == "channel"

    def section_records(self, section: Section) -> list[dict[str, Any]]:
        """One section as display-ready records: the shape of every human-facing output."""
        if self._vertical():
            with_rates = any(c.rate for c in section.columns)
            return [
                {
                    "Metric": c.label,
                    "Count": self.totals[c.count],
                    **(
                        {
                            "Rate": _fmt_rate(self.totals[c.rate]) if c.rate else "",
                            "Rate basis": self._basis(c.rate) if c.rate else "",
                        }
                        if with_rates
                        else {}
                    ),
                }
                for c in section.columns
            ]
        records = []
        for row, is_total in [*((r, False) for r in self._section_rows(section)), (self.totals, True)]:
            record: dict[str, Any] = {}
            for i, k in enumerate(self.keys):
                record[KEY_LABELS[k]] = ("Total" if i == 0 else "") if is_total else _fmt_key(row[k])
            for c in section.columns:
                record[c.label] = row[c.count]
                if c.rate:
                    record[_rate_label(c.rate)] = _fmt_rate(row[c.rate])
            records.append(record)
        return records

    def _heading(self, section: Section) -> str:
        return section.title if self._vertical() else f"{section.title} by {self.dimension}"

    def _filter_text(self) -> str:
        parts = [f"{k}={_json_default(v) if isinstance(v, datetime) else v}" for k, v in self.filters.items() if v]
        return ", ".join(parts) if parts else "all events"

    def to_rich_tables(self) -> list[Table]:
        """One table per active channel; by channel the metrics run down, otherwise groups do."""
        from rich.table import Table  # only when printing: the dispatch path never needs rich

        tables = []
        for section in self.active_sections():
            filtered = any(self.filters.values())
            title = f"{self._heading(section)} ({self._filter_text()})" if filtered else self._heading(section)
            table = Table(title=title, title_justify="left")
            if self._vertical():
                records = self.section_records(section)
                for name in records[0]:
                    table.add_column(name, justify="right" if name in ("Count", "Rate") else "left")
                for record in records:
                    table.add_row(*(str(v) for v in record.values()))
            else:
                for k in self.keys:
                    table.add_column(KEY_LABELS[k], overflow="fold")
                for c in section.columns:
                    table.add_column(c.short or c.label, justify="right", overflow="fold")
                for row in self._section_rows(section):
                    table.add_row(*(_fmt_key(row[k]) for k in self.keys), *self._cells(section, row))
                table.add_section()
                labels = ["Total", *[""] * (len(self.keys) - 1)]
                table.add_row(*labels, *self._cells(section, self.totals), style="bold")
            tables.append(table)
        return tables

    @staticmethod
    def _cells(section: Section, row: dict[str, Any]) -> list[str]:
        # The rate under its count keeps a dozen email columns within a terminal's width.
        return [f"{row[c.count]}\n{_fmt_rate(row[c.rate])}" if c.rate else str(row[c.count]) for c in section.columns]

    def to_markdown(self, *, heading: bool = True) -> str:
        lines = [f"# {self.title}", "", f"Grouped by **{self.dimension}**; {self._filter_text()}.", ""] if heading else []
        left = 1 if self._vertical() else len(self.keys)  # labels left, numbers right
        for section in self.active_sections():
            records = self.section_records(section)
            headers = list(records[0])
            lines += [f"## {self._heading(section)}", ""]
            lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            lines.append("|" + "|".join(" --- " if i < left else " ---: " for i in range(len(headers))) + "|")
            lines += ["| " + " | ".join(_md_cell(v) for v in record.values()) + " |" for record in records]
            lines.append("")
        return "\n".join(lines)

    def artifact_tables(self) -> dict[str, list[dict[str, Any]]]:
        """Per active section, the records a Prefect table artifact shows as they are."""
        return {section.name: self.section_records(section) for section in self.active_sections()}


def _csv(value: Any) -> Any:
    return "" if value is None else value


# ---------------------------------------------------------------------------- the queries


def _where(
    conn: Connection, sequence: str | None, since: datetime | None, until: datetime | None
) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = []
    if sequence is not None:
        clauses.append(events.c.sequence == sequence)
    occurred: ColumnElement[Any] = events.c.occurred_at
    if conn.dialect.name == "sqlite":
        # Unary + keeps SQLite off ix_events_occurred: over a wide period, a row lookup per
        # event costs far more than reading the period out of the covering report index.
        occurred = UnaryExpression(occurred, operator=operators.custom_op("+"), type_=occurred.type)
    if since is not None:
        clauses.append(occurred >= since)
    if until is not None:
        clauses.append(occurred < until)
    return clauses


def _cube(conn: Connection, kinds: Iterable[str], where: list[ColumnElement[bool]]) -> list[dict[str, Any]]:
    """Distinct touches per (sequence, step, variant, sender, channel, kind): one statement."""
    # A touch with several events of one kind (re-opens, a soft then a hard bounce) counts
    # once; an event without a touch (a meeting booked from a calendar link) counts alone.
    touch = distinct(func.coalesce(events.c.touch_id, -events.c.id))
    stmt = (
        select(*(col.label(name) for name, col in GRAIN.items()))
        .add_columns(
            func.min(events.c.id).label("first_event_id"),
            func.count(touch).label("touches"),
            # FILTER, not CASE: PostgreSQL then sorts only the bounces for these DISTINCTs.
            func.count(touch).filter(events.c.detail == "hard").label("hard"),
            func.count(touch).filter(events.c.detail == "soft").label("soft"),
        )
        .where(events.c.kind.in_(sorted(set(kinds))), *where)
        .group_by(*GRAIN.values())
    )
    return [dict(rec) for rec in conn.execute(stmt).mappings()]


def _with_rates(row: dict[str, Any], rates: Iterable[Rate]) -> dict[str, Any]:
    for r in rates:
        denominator = sum(row[d] for d in r.denominator)
        row[r.key] = row[r.numerator] / denominator if denominator else None
    return row


def _sort_key(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple((v is None, "" if v is None else v) for v in values)


def _roll_up(
    cube: list[dict[str, Any]], counts: Sequence[Count], rates: Sequence[Rate], keys: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Group rows and totals from the cube.

    A touch's events all carry its sequence, step, variant, sender and channel, so distinct
    touches add up across cells, groups and the totals without a second pass over events.
    """
    by_kind: dict[str, list[Count]] = {}
    for c in counts:
        by_kind.setdefault(c.kind, []).append(c)
    column = {None: "touches", "hard": "hard", "soft": "soft"}
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    first_event: dict[tuple[Any, ...], int] = {}
    for cell in cube:
        key = tuple(cell[k] for k in keys)
        row = groups.get(key)
        if row is None:
            row = groups[key] = {**dict(zip(keys, key)), **{c.key: 0 for c in counts}}
            first_event[key] = cell["first_event_id"]
        first_event[key] = min(first_event[key], cell["first_event_id"])
        for c in by_kind.get(cell["kind"], ()):
            if c.channel is None or c.channel == cell["channel"]:
                row[c.key] += int(cell[column[c.detail]])
    if "step" in keys:
        # Steps in the order they first happened, which is the cadence's order, not alphabetical.
        order = sorted(groups, key=lambda g: (_sort_key(g[:1]), first_event[g], _sort_key(g[2:])))
    else:
        order = sorted(groups, key=_sort_key)
    totals = {c.key: sum(groups[g][c.key] for g in order) for c in counts}
    return [_with_rates(groups[g], rates) for g in order], _with_rates(totals, rates)


def build_report(
    conn: Connection,
    *,
    by: Dimension = "channel",
    sequence: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Report:
    """Per-channel funnel of the event log grouped by one dimension, in `since <= t < until`.

    `by="step"` groups by (sequence, step) and `by="variant"` by (sequence, step, variant),
    since those ids only mean something inside their sequence; `by="variant"` leaves out
    events without a variant, so it compares A/B variants only.
    """
    if by not in get_args(Dimension):
        raise ValueError(f"unknown report dimension {by!r}: use one of {', '.join(get_args(Dimension))}")
    keys = DIMENSIONS[by]
    where = _where(conn, sequence, since, until)
    if by == "variant":
        where.append(events.c.variant.is_not(None))
    cube = _cube(conn, (c.kind for c in COUNTS), where)
    rows, totals = _roll_up(cube, COUNTS, RATES, keys)
    return Report(
        dimension=by,
        keys=keys,
        rows=rows,
        totals=totals,
        filters={"sequence": sequence, "since": since, "until": until},
    )


@dataclass
class DeliverabilityReport:
    """Mailbox health: the same email counts per sending mailbox and per sequence."""

    by_sender: Report
    by_sequence: Report

    @property
    def totals(self) -> dict[str, Any]:
        return self.by_sender.totals

    @property
    def filters(self) -> dict[str, Any]:
        return self.by_sender.filters

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": "Email deliverability",
            "view": "deliverability",
            "filters": self.filters,
            "by_sender": self.by_sender.rows,
            "by_sequence": self.by_sequence.rows,
            "totals": self.totals,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default, ensure_ascii=False)

    def to_csv(self) -> str:
        """Long format: `by` says which grouping a row belongs to, `key` is its group."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        metrics = self.by_sender.metric_keys
        writer.writerow(["by", "key", *metrics])
        for report in (self.by_sender, self.by_sequence):
            for row in report.rows:
                key = row[report.keys[0]]
                writer.writerow([report.dimension, "" if key is None else key, *(_csv(row[m]) for m in metrics)])
        writer.writerow(["TOTAL", "", *(_csv(self.totals[m]) for m in metrics)])
        return out.getvalue()

    def to_rich_tables(self) -> list[Table]:
        return [*self.by_sender.to_rich_tables(), *self.by_sequence.to_rich_tables()]

    def to_markdown(self) -> str:
        return "\n".join([self.by_sender.to_markdown(), self.by_sequence.to_markdown(heading=False)])

    def artifact_tables(self) -> dict[str, list[dict[str, Any]]]:
        section = DELIVERABILITY_SECTIONS[0]
        return {
            "deliverability-by-sender": self.by_sender.section_records(section),
            "deliverability-by-sequence": self.by_sequence.section_records(section),
        }


def deliverability_report(
    conn: Connection,
    since: datetime | None = None,
    *,
    until: datetime | None = None,
    sequence: str | None = None,
) -> DeliverabilityReport:
    """Bounces, complaints and opt-outs per mailbox: what gets a sending domain blocklisted.

    Counts distinct email touches: delivered, bounces (all, and hard and soft apart by the
    event's detail), complaints, opt-outs, auto-replies (out of office, never a reply) and
    human replies, per sending mailbox and per sequence, in one statement.
    """
    where = [*_where(conn, sequence, since, until), events.c.channel == str(Channel.email)]
    filters = {"sequence": sequence, "since": since, "until": until}
    cube = _cube(conn, (c.kind for c in DELIVERABILITY_COUNTS), where)
    reports = []
    for dim in ("sender", "sequence"):
        rows, totals = _roll_up(cube, DELIVERABILITY_COUNTS, DELIVERABILITY_RATES, (dim,))
        reports.append(
            Report(
                dimension=dim,
                keys=(dim,),
                rows=rows,
                totals=totals,
                filters=filters,
                sections=DELIVERABILITY_SECTIONS,
                rates=DELIVERABILITY_RATES,
                title="Email deliverability",
                view="deliverability",
            )
        )
    return DeliverabilityReport(by_sender=reports[0], by_sequence=reports[1])


__all__ = [
    "DeliverabilityReport",
    "Dimension",
    "Report",
    "build_report",
    "deliverability_report",
]

"""The cadence spec: pydantic models behind the YAML files SDRs write.

Step ids are the stable identity of a step: an enrollment in flight follows the current
file from its next step on, and each touch records the spec version it ran.
"""

from __future__ import annotations

import hashlib
import re
from datetime import time
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relance.conditions import check_syntax
from relance.errors import SpecError, SpecInvalid, UserInputError
from relance.events import Channel, EventKind
from relance.yamlpos import line_of, load_with_lines

SLUG = r"^[a-z0-9][a-z0-9_-]*$"
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WAIT_UNITS = {
    "minute": "minutes", "minutes": "minutes", "min": "minutes",
    "hour": "hours", "hours": "hours", "h": "hours",
    "day": "days", "days": "days", "calendar day": "days", "calendar days": "days",
    "business day": "business_days", "business days": "business_days",
    "week": "weeks", "weeks": "weeks",
}
_WAIT_RE = re.compile(r"^\s*(\d+)\s*([a-z ]+?)\s*$")
_RANGE_RE = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Wait(_Model):
    """How long after the previous step (or the enrollment) a step becomes due."""

    amount: int = Field(ge=0)
    unit: Literal["minutes", "hours", "days", "business_days", "weeks"]

    @model_validator(mode="before")
    @classmethod
    def _parse_text(cls, value: Any) -> Any:
        if isinstance(value, int):
            return {"amount": value, "unit": "days"}
        if isinstance(value, str):
            match = _WAIT_RE.match(value.lower())
            unit = WAIT_UNITS.get(match.group(2)) if match else None
            if not match or unit is None:
                raise ValueError(
                    f"cannot read wait {value!r}: write e.g. '2 hours', '3 days', '1 business day', '1 week'"
                )
            return {"amount": int(match.group(1)), "unit": unit}
        return value

    def __str__(self) -> str:
        return f"{self.amount} {self.unit.replace('_', ' ')}"


class TimeRange(_Model):
    start: time
    end: time

    @property
    def spans_midnight(self) -> bool:
        return self.end <= self.start


class Window(_Model):
    """When touches may go out, in the prospect's local time."""

    days: frozenset[int] = frozenset(range(5))  # 0 = Monday
    hours: tuple[TimeRange, ...] = (TimeRange(start=time(9), end=time(18)),)

    @field_validator("days", mode="before")
    @classmethod
    def _parse_days(cls, value: Any) -> Any:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple, set, frozenset)):
            return value
        days: set[int] = set()
        for item in items:
            if isinstance(item, int):
                days.add(item)
                continue
            item = str(item).strip().lower()
            if "-" in item:
                first, last = (part.strip()[:3] for part in item.split("-", 1))
                if first not in DAY_NAMES or last not in DAY_NAMES:
                    raise ValueError(f"unknown day range {item!r}: use mon, tue, wed, thu, fri, sat, sun")
                a, b = DAY_NAMES.index(first), DAY_NAMES.index(last)
                days.update(DAY_NAMES.index(d) % 7 for d in _cycle(a, b))
            elif item[:3] in DAY_NAMES:
                days.add(DAY_NAMES.index(item[:3]))
            else:
                raise ValueError(f"unknown day {item!r}: use mon, tue, wed, thu, fri, sat, sun")
        if not days:
            raise ValueError("a window needs at least one day")
        return frozenset(days)

    @field_validator("hours", mode="before")
    @classmethod
    def _parse_hours(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        ranges = []
        for item in value:
            if not isinstance(item, str):
                ranges.append(item)
                continue
            match = _RANGE_RE.match(item.strip())
            if not match:
                raise ValueError(f"cannot read hours {item!r}: write 'HH:MM-HH:MM', e.g. '09:00-12:00'")
            h1, m1, h2, m2 = (int(g) for g in match.groups())
            if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59:
                raise ValueError(f"impossible time in {item!r}")
            end = time(0) if h2 == 24 else time(h2, m2)
            if (h1, m1) == (h2 % 24, m2):
                raise ValueError(f"empty window {item!r}: start and end are equal")
            ranges.append({"start": time(h1, m1), "end": end})
        if not ranges:
            raise ValueError("a window needs at least one range of hours")
        return tuple(ranges)


def _cycle(a: int, b: int) -> list[str]:
    out, i = [], a
    while True:
        out.append(DAY_NAMES[i])
        if i == b:
            return out
        i = (i + 1) % 7


class Schedule(_Model):
    timezone: str = "prospect"  # 'prospect' or an IANA zone
    window: Window = Window()
    holidays: str | None = "prospect"  # ISO country code, 'prospect', or null for none
    jitter_minutes: int = Field(default=15, ge=0, le=240)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value != "prospect":
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}: use 'prospect' or an IANA name like Europe/Paris") from None
        return value

    @field_validator("holidays")
    @classmethod
    def _country(cls, value: str | None) -> str | None:
        if value is None or value == "prospect":
            return value
        import holidays

        code = value.upper()
        if code not in holidays.list_supported_countries():
            raise ValueError(f"unknown holiday country {value!r}: use an ISO 3166 code such as FR, GB, US")
        return code


class Variant(_Model):
    id: Annotated[str, Field(pattern=SLUG)]
    subject: str | None = None
    template: str | None = None
    weight: int = Field(default=1, ge=1)


class EmailStep(_Model):
    template: str | None = None
    subject: str | None = None
    variants: tuple[Variant, ...] = ()
    reply_to: str | None = None  # thread on this earlier step's email

    @model_validator(mode="after")
    def _has_body(self) -> "EmailStep":
        if not self.template and not (self.variants and all(v.template for v in self.variants)):
            raise ValueError("an email step needs a template (here or in every variant)")
        ids = [v.id for v in self.variants]
        if len(ids) != len(set(ids)):
            raise ValueError("variant ids must be unique within the step")
        return self


class LinkedinStep(_Model):
    action: Literal["visit", "invite", "message"]
    template: str | None = None

    @model_validator(mode="after")
    def _message_needs_text(self) -> "LinkedinStep":
        if self.action == "message" and not self.template:
            raise ValueError("a LinkedIn message needs a template")
        if self.action == "visit" and self.template:
            raise ValueError("a LinkedIn visit sends nothing: remove the template")
        return self


class CallStep(_Model):
    script: str


class TaskStep(_Model):
    title: str
    template: str | None = None


class Step(_Model):
    id: Annotated[str, Field(pattern=SLUG)]
    wait: Wait | None = None
    when: str | None = None
    email: EmailStep | None = None
    linkedin: LinkedinStep | None = None
    call: CallStep | None = None
    task: TaskStep | None = None

    @model_validator(mode="after")
    def _one_channel(self) -> "Step":
        given = [c for c in ("email", "linkedin", "call", "task") if getattr(self, c) is not None]
        if len(given) != 1:
            raise ValueError(f"a step needs exactly one of email, linkedin, call, task (got {given or 'none'})")
        return self

    @field_validator("when")
    @classmethod
    def _condition_compiles(cls, value: str | None) -> str | None:
        if value is not None and (reason := check_syntax(value)):
            raise ValueError(reason)
        return value

    @cached_property  # read for every touch dispatched: computed once per loaded spec
    def channel(self) -> Channel:
        for name in ("email", "linkedin", "call", "task"):
            if getattr(self, name) is not None:
                return Channel(name)
        raise AssertionError("validated")

    @cached_property
    def action(self) -> str:
        if self.linkedin is not None:
            return self.linkedin.action
        return {"email": "send", "call": "call", "task": "task"}[self.channel.value]

    @property
    def templates(self) -> list[str]:
        """Every template file this step renders."""
        out: list[str] = []
        if self.email:
            out += [self.email.template] if self.email.template else []
            out += [v.template for v in self.email.variants if v.template]
        elif self.linkedin and self.linkedin.template:
            out.append(self.linkedin.template)
        elif self.call:
            out.append(self.call.script)
        elif self.task and self.task.template:
            out.append(self.task.template)
        return out


class SenderRef(_Model):
    pool: str


class OnExit(_Model):
    enroll: str


class Sequence(_Model):
    name: Annotated[str, Field(pattern=SLUG)]
    description: str = ""
    owner: str | None = None
    kind: Literal["outbound", "nurture"] = "outbound"
    exclusive: bool = True  # a prospect is active in at most one exclusive sequence
    language: str = "en"
    schedule: Schedule = Schedule()
    sender: SenderRef | None = None
    exit_on: tuple[EventKind, ...] = (EventKind.replied, EventKind.meeting_booked, EventKind.bounced, EventKind.unsubscribed)
    on_exit: dict[str, OnExit] = {}
    steps: tuple[Step, ...] = Field(min_length=1)
    # Set by the loader, not written by users.
    source: str = Field(default="", exclude=True)
    version: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _references(self) -> "Sequence":
        seen: dict[str, Step] = {}
        for index, step in enumerate(self.steps):
            if step.id in seen:
                raise _located(("steps", index, "id"), f"duplicate step id {step.id!r}")
            if step.email and step.email.reply_to:
                target = seen.get(step.email.reply_to)
                if target is None or target.email is None:
                    raise _located(
                        ("steps", index, "email", "reply_to"),
                        f"{step.email.reply_to!r} is not an earlier email step",
                    )
            seen[step.id] = step
        allowed = {k.value for k in EventKind} | {"completed"}
        for key in self.on_exit:
            if key not in allowed:
                raise _located(("on_exit", key), f"unknown outcome {key!r}: use an event kind or 'completed'")
        if self.sender is None and any(s.email for s in self.steps):
            raise _located(("sender",), "a sequence with email steps needs sender: {pool: NAME}")
        return self

    @cached_property  # looked up several times per touch dispatched
    def _positions(self) -> dict[str, int]:
        return {s.id: i for i, s in enumerate(self.steps)}

    def step(self, step_id: str) -> Step | None:
        index = self._positions.get(step_id)
        return None if index is None else self.steps[index]

    def index_of(self, step_id: str) -> int | None:
        return self._positions.get(step_id)


class _Located(ValueError):
    """A model-level error that knows which key it is about."""

    def __init__(self, path: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.path = path


def _located(path: tuple[str | int, ...], message: str) -> _Located:
    return _Located(path, message)


def parse_sequence(text: str, filename: str) -> Sequence:
    """Parse one cadence file; raises SpecInvalid listing every problem with its line."""
    try:
        data, lines = load_with_lines(text, filename)
    except UserInputError as exc:
        raise SpecInvalid([SpecError(exc.detail, file=filename, line=exc.line)]) from None
    if not isinstance(data, dict):
        raise SpecInvalid([SpecError("a cadence file must be a mapping with name and steps", file=filename, line=1)])
    try:
        seq = Sequence.model_validate(data)
    except ValidationError as exc:
        problems = []
        errors = exc.errors()
        item_paths = {tuple(e["loc"][:1]) for e in errors if len(e["loc"]) > 1 and isinstance(e["loc"][1], int)}
        for err in errors:
            if err["type"] == "too_short" and tuple(err["loc"]) in item_paths:
                continue  # the list is "empty" only because its items failed: those errors say why
            path = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
            message = err["msg"].removeprefix("Value error, ")
            ctx_error = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _Located):
                path = path + ctx_error.path
                message = str(ctx_error)
            if err["type"] == "extra_forbidden" and (allowed := _allowed_keys(path[:-1])):
                message = f"unknown key {path[-1]!r}; allowed here: {', '.join(allowed)}"
            key = ".".join(str(p) for p in path) or None
            problems.append(SpecError(message, file=filename, line=line_of(lines, path), key=key))
        raise SpecInvalid(problems) from None
    version = hashlib.sha256(text.encode()).hexdigest()[:12]
    return seq.model_copy(update={"source": filename, "version": version})


def _allowed_keys(path: tuple[str | int, ...]) -> list[str]:
    """The keys a mapping at `path` may have, by walking the models' annotations."""
    import typing

    model: Any = Sequence
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        inner = [a for c in candidates for a in (c, *typing.get_args(c)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return [name for name, f in model.model_fields.items() if not f.exclude]


_UNION_TAGS = {"function-before[_parse_text(), Wait]", "int", "str"}


def load_sequence(path: Path) -> Sequence:
    return parse_sequence(path.read_text(encoding="utf-8"), str(path))


def json_schema() -> dict[str, Any]:
    """The JSON Schema editors use to autocomplete cadence files."""
    schema = Sequence.model_json_schema(mode="validation")
    schema["title"] = "Relance cadence"
    schema.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
    return schema

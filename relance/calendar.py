"""When a touch may go out: sending windows, holidays, waits and jitter in the prospect's zone.

Windows are written in local wall-clock time, but every instant leaving this module is an
aware UTC datetime, so the store and the engine never do time-zone arithmetic themselves.
All searches walk day by day (never minute by minute) and are bounded, because this runs
for every prospect on every tick.
"""

from __future__ import annotations

import hashlib
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from relance.errors import UserInputError
from relance.spec import Wait, Window

__all__ = ["BusinessCalendar", "zone_for", "jitter_seconds"]

UTC = timezone.utc
HORIZON_DAYS = 400
_ONE_DAY = timedelta(days=1)
_MAX_CACHED_DAYS = 20_000

Interval = tuple[datetime, datetime]


@lru_cache(maxsize=1024)
def zone_for(name: str | None, fallback: str) -> ZoneInfo:
    """ZoneInfo(name) if it is a valid IANA name, else ZoneInfo(fallback).

    Prospect data is messy ("Paris", ""), and a bad zone must not stop a send; cached
    because a failed lookup hits the filesystem and the same bad value repeats across rows.
    """
    if name:
        try:
            return ZoneInfo(name.strip())
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            pass
    try:
        return ZoneInfo(fallback)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise UserInputError(
            f"unknown time zone {fallback!r}: use an IANA name like Europe/Paris", key="timezone"
        ) from None


def jitter_seconds(key: str, max_minutes: int) -> int:
    """Deterministic offset in [0, max_minutes*60) so a batch does not fire on the same second.

    Uses hashlib because hash() is salted per process, and a preview must match the real run.
    """
    span = max_minutes * 60
    if span <= 0:
        return 0
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % span


@lru_cache(maxsize=512)
def _country_holidays(country: str, year: int) -> holidays.HolidayBase:
    """Built once per country and year: construction is slow and shared by every prospect."""
    return holidays.country_holidays(country, years=year)


@lru_cache(maxsize=None)
def _check_country(country: str) -> str:
    if country not in holidays.list_supported_countries():
        raise UserInputError(
            f"unknown holiday country {country!r}: use an ISO 3166 code such as FR, GB, US", key="holidays"
        )
    return country


def _localize(wall: datetime, zone: ZoneInfo) -> datetime:
    """Local wall-clock time to UTC, with the module's DST rule.

    An ambiguous time (fall-back overlap) takes its first occurrence (fold=0); a time that
    does not exist (spring-forward gap) becomes the first instant after the gap, not
    Python's default of shifting it forward by the gap's length.
    """
    candidate = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if candidate.astimezone(zone).replace(tzinfo=None, fold=0) == wall:
        return candidate
    # In a gap fold=1 reads the wall with the later offset, giving the earlier instant; the
    # transition lies between the two readings. Bisect on whole seconds (tzdata's unit).
    lo = int(wall.replace(tzinfo=zone, fold=1).astimezone(UTC).timestamp())
    hi = int(candidate.timestamp())
    while lo < hi:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) > wall:
            hi = mid
        else:
            lo = mid + 1
    return datetime.fromtimestamp(lo, UTC)


def _as_utc(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at!r}: pass an aware datetime (UTC or a zone)")
    return at.astimezone(UTC)


class _Rules:
    """The open intervals of one (window, zone, country), computed once per local day.

    Shared between every BusinessCalendar with the same settings, so a million prospects
    in a handful of zones compute each day a handful of times.
    """

    def __init__(self, days: frozenset[int], ranges: tuple[tuple[time, time], ...], zone: ZoneInfo, country: str | None):
        self.days, self.ranges, self.zone, self.country = days, ranges, zone, country
        self._by_day: dict[date, tuple[Interval, ...]] = {}

    def is_holiday(self, day: date) -> bool:
        return self.country is not None and day in _country_holidays(self.country, day.year)

    def day(self, day: date) -> tuple[Interval, ...]:
        """Intervals that start on this local day, sorted by start."""
        cached = self._by_day.get(day)
        if cached is not None:
            return cached
        if day.weekday() not in self.days or self.is_holiday(day):
            out: tuple[Interval, ...] = ()
        else:
            found = []
            for start, end in self.ranges:
                s = _localize(datetime.combine(day, start), self.zone)
                e = _localize(datetime.combine(day + _ONE_DAY if end <= start else day, end), self.zone)
                if s < e:  # a range swallowed by a DST gap is empty that day
                    found.append((s, e))
            out = tuple(sorted(found))
        if len(self._by_day) >= _MAX_CACHED_DAYS:
            self._by_day.clear()
        self._by_day[day] = out
        return out

    def stream(self, first: date, days: int = HORIZON_DAYS) -> Iterator[Interval]:
        """Raw intervals in start order: local days map to UTC monotonically, so days concatenate."""
        day = first
        for _ in range(days):
            yield from self.day(day)
            day += _ONE_DAY


@lru_cache(maxsize=1024)
def _rules_for(window: Window, zone: ZoneInfo, country: str | None) -> _Rules:
    ranges = tuple((r.start.replace(tzinfo=None), r.end.replace(tzinfo=None)) for r in window.hours)
    return _Rules(frozenset(window.days), ranges, zone, country)


class BusinessCalendar:
    """One prospect's view of a schedule: window, zone and public holidays.

    Cheap to build (rules are shared through a module cache) so callers can make one per
    prospect without thinking about it.
    """

    def __init__(self, window: Window, zone: ZoneInfo, country: str | None = None):
        code = country.strip().upper() if country else None
        self.window, self.zone, self.country = window, zone, (_check_country(code) if code else None)
        self._rules = _rules_for(window, zone, self.country)
        self._due: dict[tuple[datetime, int, str | None], tuple[datetime, datetime | None, datetime | None]] = {}
        self._open: tuple[datetime, bool] | None = None  # the last is_open answer: a batch asks about one instant

    def __repr__(self) -> str:
        return f"BusinessCalendar(zone={self.zone.key!r}, country={self.country!r})"

    def _local_date(self, at_utc: datetime) -> date:
        return at_utc.astimezone(self.zone).date()

    def is_holiday(self, day: date) -> bool:
        return self._rules.is_holiday(day)

    def is_business_day(self, day: date) -> bool:
        """Mon-Fri minus holidays, whatever the window says: "business day" is a promise to the SDR."""
        return day.weekday() < 5 and not self._rules.is_holiday(day)

    def is_open(self, at: datetime) -> bool:
        if self._open is not None and self._open[0] is at:
            return self._open[1]
        answer = self._is_open(_as_utc(at))
        self._open = (at, answer)
        return answer

    def _is_open(self, at: datetime) -> bool:
        # Only intervals starting the local day before (spanning midnight) or the same day can hold `at`.
        for s, e in self._rules.stream(self._local_date(at) - _ONE_DAY, 2):
            if s > at:
                return False
            if e > at:
                return True
        return False

    def _scan(self, at: datetime, merge: bool) -> Interval:
        """First raw interval ending after `at`; with merge, its end extended over touching intervals.

        If its start is <= at, `at` is open; otherwise the start is the next opening.
        """
        stream = self._rules.stream(self._local_date(at) - _ONE_DAY)
        for s, e in stream:
            if e > at:
                break
        else:
            raise UserInputError(
                f"window never opens within {HORIZON_DAYS} days after {at.isoformat()} "
                f"({self.zone.key}, holidays {self.country or 'none'})",
                key="schedule.window",
            )
        if merge:
            for s2, e2 in stream:
                if s2 > e:
                    break
                if e2 > e:
                    e = e2
        return s, e

    def open_interval(self, at: datetime) -> Interval | None:
        """The whole open interval around `at` (touching or overlapping ranges count as one)."""
        at = _as_utc(at)
        if not self.is_open(at):
            return None
        s, e = self._scan(at, merge=True)
        # Extend backwards: a range from an earlier day may run into this one.
        day = self._local_date(at)
        floor = day - timedelta(days=HORIZON_DAYS)
        while day >= floor and day >= self._local_date(s) - _ONE_DAY:
            for rs, re_ in reversed(self._rules.day(day)):
                if rs < s <= re_:
                    s = rs
            day -= _ONE_DAY
        return s, e

    def next_opening(self, at: datetime) -> datetime:
        at = _as_utc(at)
        s, _ = self._scan(at, merge=False)
        return at if s <= at else s

    def add_wait(self, start: datetime, wait: Wait) -> datetime:
        """Hours are elapsed time; days keep the local wall clock (so a DST day is 23 or 25 h)."""
        start = _as_utc(start)
        n = wait.amount
        if n == 0:
            return start
        if wait.unit == "minutes":
            return start + timedelta(minutes=n)
        if wait.unit == "hours":
            return start + timedelta(hours=n)
        local = start.astimezone(self.zone).replace(tzinfo=None, fold=0)
        if wait.unit in ("days", "weeks"):
            return _localize(local + timedelta(days=n * (7 if wait.unit == "weeks" else 1)), self.zone)
        if wait.unit == "business_days":
            day = local.date()
            for _ in range(n):
                for _step in range(HORIZON_DAYS):
                    day += _ONE_DAY
                    if self.is_business_day(day):
                        break
                else:
                    raise UserInputError(
                        f"no business day within {HORIZON_DAYS} days after {day.isoformat()} "
                        f"(holidays {self.country or 'none'})",
                        key="wait",
                    )
            return _localize(datetime.combine(day, local.time()), self.zone)
        raise AssertionError(f"unknown wait unit {wait.unit!r}")

    def due_time(self, start: datetime, wait: Wait | None, jitter_key: str, jitter_minutes: int) -> datetime:
        """When a step fires; jitter only when moved to an opening, so on-time touches stay exact."""
        key = (start, wait.amount, wait.unit) if wait is not None else (start, 0, None)
        base = self._due.get(key)
        if base is None:  # a batch moves thousands of prospects by the same wait from the same `now`
            if len(self._due) >= 1024:
                self._due.clear()
            t = self.add_wait(start, wait) if wait is not None else _as_utc(start)
            s, _ = self._scan(t, merge=False)
            base = self._due[key] = (t, None, None) if s <= t else (t, *self._scan(t, merge=True))
        t, s, e = base
        if s is None:
            return t
        jitter = jitter_seconds(jitter_key, jitter_minutes)
        if jitter == 0:
            return s
        if s + timedelta(seconds=jitter) >= e:
            length = int((e - s).total_seconds())
            jitter = jitter % length if length > 0 else 0
        return s + timedelta(seconds=jitter)

    def openings(self, start: datetime, limit: int) -> list[Interval]:
        """The next `limit` open intervals; one already open at `start` comes first, unclipped."""
        out: list[Interval] = []
        t = _as_utc(start)
        if limit <= 0:
            return out
        current = self.open_interval(t)
        if current is not None:
            out.append(current)
            t = current[1]
        while len(out) < limit:
            s, e = self._scan(t, merge=True)
            out.append((s, e))
            t = e
        return out

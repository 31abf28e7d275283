"""Windows, waits, holidays and jitter on a simulated clock.

Dates are chosen around the 2027 Paris DST changes (28 March, 31 October) and French
holidays, where off-by-an-hour and off-by-a-day bugs hide.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

import relance.calendar as calmod
from relance.calendar import BusinessCalendar, jitter_seconds, zone_for
from relance.errors import UserInputError
from relance.spec import Wait, Window

UTC = timezone.utc
PARIS = ZoneInfo("Europe/Paris")
NY = ZoneInfo("America/New_York")


def window(days: str, *hours: str) -> Window:
    return Window.model_validate({"days": days, "hours": list(hours)})


def paris(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=PARIS, fold=fold)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


OFFICE = window("mon-fri", "09:00-17:00")
LUNCH = window("mon-fri", "09:00-12:00", "14:00-17:30")
NIGHT = window("mon-fri", "22:00-02:00")
SUN_NIGHT = window("sun", "02:30-04:00")
IN_GAP = window("mon-sun", "02:00-02:59")


# --- zone_for and jitter ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [("Europe/Paris", "Europe/Paris"), ("America/New_York", "America/New_York"), ("Paris", "UTC"),
     ("", "UTC"), (None, "UTC"), ("../etc/passwd", "UTC")],
)
def test_zone_for_falls_back_on_bad_names(name, expected):
    assert zone_for(name, "UTC").key == expected


def test_zone_for_bad_fallback_is_a_user_error():
    with pytest.raises(UserInputError):
        zone_for("nowhere", "Mars/Olympus")


def test_jitter_is_deterministic_bounded_and_spread():
    values = [jitter_seconds(f"prospect-{i}:step-2", 15) for i in range(500)]
    assert values == [jitter_seconds(f"prospect-{i}:step-2", 15) for i in range(500)]
    assert all(0 <= v < 15 * 60 for v in values)
    assert len(set(values)) > 300  # spread, not a constant
    assert jitter_seconds("anything", 0) == 0


def test_jitter_is_stable_across_processes():
    # Pinned: hash() is salted per process, hashlib is not; a preview must match the real run.
    assert jitter_seconds("abc", 15) == 421


# --- open / next opening ---------------------------------------------------------------


@pytest.mark.parametrize(
    "at, is_open, opening",
    [
        (paris(2027, 1, 13, 10, 0), True, utc(2027, 1, 13, 9, 0)),     # inside the morning
        (paris(2027, 1, 13, 9, 0), True, utc(2027, 1, 13, 8, 0)),      # start is inclusive
        (paris(2027, 1, 13, 12, 0), False, utc(2027, 1, 13, 13, 0)),   # end is exclusive
        (paris(2027, 1, 13, 12, 30), False, utc(2027, 1, 13, 13, 0)),  # lunch -> 14:00 Paris
        (paris(2027, 1, 13, 17, 30), False, utc(2027, 1, 14, 8, 0)),   # evening -> next morning
        (paris(2027, 1, 15, 18, 0), False, utc(2027, 1, 18, 8, 0)),    # Friday evening -> Monday
        (paris(2027, 1, 16, 10, 0), False, utc(2027, 1, 18, 8, 0)),    # Saturday -> Monday
    ],
)
def test_lunch_window(at, is_open, opening):
    cal = BusinessCalendar(LUNCH, PARIS, "FR")
    assert cal.is_open(at) is is_open
    assert cal.next_opening(at) == opening


def test_one_calendar_answers_each_instant_it_is_asked_about():
    """Dispatch asks one shared calendar about the same instant for a whole batch; the answer it
    keeps for that instant must not leak into the next one asked."""
    cal = BusinessCalendar(LUNCH, PARIS, "FR")
    morning, lunch = paris(2027, 1, 13, 10, 0), paris(2027, 1, 13, 12, 30)
    assert [cal.is_open(at) for at in (morning, morning, lunch, lunch, morning)] == [True, True, False, False, True]
    assert cal.is_open(datetime(2027, 1, 13, 12, 30, tzinfo=PARIS)) is False  # an equal instant, another object


def test_next_opening_of_an_open_instant_is_unchanged_and_utc():
    cal = BusinessCalendar(LUNCH, PARIS)
    at = paris(2027, 1, 13, 10, 17, 42)
    got = cal.next_opening(at)
    assert got == at and got.utcoffset() == timedelta(0)
    assert cal.next_opening(at.astimezone(NY)) == at  # any input zone


def test_open_interval():
    cal = BusinessCalendar(LUNCH, PARIS)
    assert cal.open_interval(paris(2027, 1, 13, 10, 0)) == (utc(2027, 1, 13, 8, 0), utc(2027, 1, 13, 11, 0))
    assert cal.open_interval(paris(2027, 1, 13, 15, 0)) == (utc(2027, 1, 13, 13, 0), utc(2027, 1, 13, 16, 30))
    assert cal.open_interval(paris(2027, 1, 13, 12, 30)) is None


def test_touching_and_overlapping_ranges_form_one_interval():
    cal = BusinessCalendar(window("mon-fri", "14:00-16:00", "09:00-12:00", "11:00-14:00"), PARIS)
    assert cal.open_interval(paris(2027, 1, 13, 15, 0)) == (utc(2027, 1, 13, 8, 0), utc(2027, 1, 13, 15, 0))
    assert cal.openings(paris(2027, 1, 13, 7, 0), 2) == [
        (utc(2027, 1, 13, 8, 0), utc(2027, 1, 13, 15, 0)),
        (utc(2027, 1, 14, 8, 0), utc(2027, 1, 14, 15, 0)),
    ]


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError):
        BusinessCalendar(OFFICE, PARIS).next_opening(datetime(2027, 1, 13, 10, 0))


# --- windows spanning midnight ---------------------------------------------------------


@pytest.mark.parametrize(
    "at, is_open, opening",
    [
        (paris(2027, 1, 15, 21, 59), False, utc(2027, 1, 15, 21, 0)),  # Friday before 22:00
        (paris(2027, 1, 15, 23, 0), True, utc(2027, 1, 15, 22, 0)),    # Friday night
        (paris(2027, 1, 16, 1, 0), True, utc(2027, 1, 16, 0, 0)),      # Fri->Sat: Saturday 01:00 is Friday's
        (paris(2027, 1, 16, 2, 0), False, utc(2027, 1, 18, 21, 0)),    # ends at 02:00 sharp
        (paris(2027, 1, 16, 23, 0), False, utc(2027, 1, 18, 21, 0)),   # Saturday is not a window day
        (paris(2027, 1, 18, 1, 0), False, utc(2027, 1, 18, 21, 0)),    # Monday 01:00 would be Sunday's
        (paris(2027, 1, 19, 1, 0), True, utc(2027, 1, 19, 0, 0)),      # Tuesday 01:00 is Monday's
    ],
)
def test_window_spanning_midnight(at, is_open, opening):
    cal = BusinessCalendar(NIGHT, PARIS)
    assert cal.is_open(at) is is_open
    assert cal.next_opening(at) == opening


def test_midnight_interval_belongs_to_its_start_day():
    cal = BusinessCalendar(NIGHT, PARIS)
    assert cal.open_interval(paris(2027, 1, 16, 1, 0)) == (utc(2027, 1, 15, 21, 0), utc(2027, 1, 16, 1, 0))
    assert cal.openings(paris(2027, 1, 15, 12, 0), 3) == [
        (utc(2027, 1, 15, 21, 0), utc(2027, 1, 16, 1, 0)),
        (utc(2027, 1, 18, 21, 0), utc(2027, 1, 19, 1, 0)),
        (utc(2027, 1, 19, 21, 0), utc(2027, 1, 20, 1, 0)),
    ]


def test_end_at_midnight_means_end_of_day():
    cal = BusinessCalendar(window("fri", "20:00-24:00"), PARIS)
    assert cal.open_interval(paris(2027, 1, 15, 23, 59)) == (utc(2027, 1, 15, 19, 0), utc(2027, 1, 15, 23, 0))
    assert not cal.is_open(paris(2027, 1, 16, 0, 0))


def test_night_ranges_chain_across_days():
    cal = BusinessCalendar(window("mon-sun", "22:00-02:00", "00:00-06:00"), PARIS)
    assert cal.open_interval(paris(2027, 1, 13, 23, 0)) == (utc(2027, 1, 13, 21, 0), utc(2027, 1, 14, 5, 0))
    assert cal.open_interval(paris(2027, 1, 14, 3, 0)) == (utc(2027, 1, 13, 21, 0), utc(2027, 1, 14, 5, 0))


def test_openings_from_an_open_instant_include_the_current_interval():
    cal = BusinessCalendar(OFFICE, PARIS)
    got = cal.openings(paris(2027, 1, 15, 16, 0), 2)
    assert got == [(utc(2027, 1, 15, 8, 0), utc(2027, 1, 15, 16, 0)), (utc(2027, 1, 18, 8, 0), utc(2027, 1, 18, 16, 0))]
    assert cal.openings(paris(2027, 1, 15, 16, 0), 0) == []


# --- DST -------------------------------------------------------------------------------
# Paris 2027: spring forward Sun 28 March 02:00 CET -> 03:00 CEST (01:00 UTC);
# fall back Sun 31 October 03:00 CEST -> 02:00 CET (01:00 UTC). Easter Monday is 29 March.


@pytest.mark.parametrize(
    "start, wait, expected, elapsed_hours",
    [
        # spring forward: a calendar day keeps 10:00 and lasts 23 h; 24 hours do not
        (paris(2027, 3, 27, 10, 0), "1 day", utc(2027, 3, 28, 8, 0), 23),
        (paris(2027, 3, 27, 10, 0), "24 hours", utc(2027, 3, 28, 9, 0), 24),
        (paris(2027, 3, 27, 10, 0), "1440 minutes", utc(2027, 3, 28, 9, 0), 24),
        (paris(2027, 3, 22, 10, 0), "1 week", utc(2027, 3, 29, 8, 0), 7 * 24 - 1),
        # 02:30 does not exist on the 28th: first instant after the gap, 03:00 CEST
        (paris(2027, 3, 27, 2, 30), "1 day", utc(2027, 3, 28, 1, 0), 23.5),
        # fall back: a calendar day lasts 25 h
        (paris(2027, 10, 30, 10, 0), "1 day", utc(2027, 10, 31, 9, 0), 25),
        (paris(2027, 10, 30, 10, 0), "24 hours", utc(2027, 10, 31, 8, 0), 24),
        (paris(2027, 10, 25, 10, 0), "1 week", utc(2027, 11, 1, 9, 0), 7 * 24 + 1),
        # 02:30 happens twice on the 31st: the first one (CEST)
        (paris(2027, 10, 30, 2, 30), "1 day", utc(2027, 10, 31, 0, 30), 24),
        (paris(2027, 10, 31, 2, 30, fold=1), "1 day", utc(2027, 11, 1, 1, 30), 24),
    ],
)
def test_waits_across_dst(start, wait, expected, elapsed_hours):
    got = BusinessCalendar(OFFICE, PARIS).add_wait(start, Wait.model_validate(wait))
    assert got == expected
    assert got.utcoffset() == timedelta(0)
    assert (got - start) == timedelta(hours=elapsed_hours)


@pytest.mark.parametrize(
    "win, country, at, opening, interval",
    [
        # Friday evening before spring forward: Monday 09:00 is now CEST (07:00 UTC)...
        (OFFICE, None, paris(2027, 3, 26, 18, 0), utc(2027, 3, 29, 7, 0), (utc(2027, 3, 29, 7, 0), utc(2027, 3, 29, 15, 0))),
        # ...unless Monday is Easter Monday
        (OFFICE, "FR", paris(2027, 3, 26, 18, 0), utc(2027, 3, 30, 7, 0), (utc(2027, 3, 30, 7, 0), utc(2027, 3, 30, 15, 0))),
        # a window starting inside the gap opens when the gap ends (03:00 CEST), ends 04:00 CEST
        (SUN_NIGHT, None, paris(2027, 3, 28, 0, 0), utc(2027, 3, 28, 1, 0), (utc(2027, 3, 28, 1, 0), utc(2027, 3, 28, 2, 0))),
        # a window entirely inside the gap does not open that day
        (IN_GAP, None, paris(2027, 3, 27, 3, 0), utc(2027, 3, 29, 0, 0), (utc(2027, 3, 29, 0, 0), utc(2027, 3, 29, 0, 59))),
        # fall back: opening at the first 02:30 (CEST), closing at 04:00 CET: 2.5 h long
        (SUN_NIGHT, None, paris(2027, 10, 31, 0, 0), utc(2027, 10, 31, 0, 30), (utc(2027, 10, 31, 0, 30), utc(2027, 10, 31, 3, 0))),
        # Friday before fall back: Monday 09:00 CET (08:00 UTC), or Tuesday in France (All Saints)
        (OFFICE, None, paris(2027, 10, 29, 18, 0), utc(2027, 11, 1, 8, 0), (utc(2027, 11, 1, 8, 0), utc(2027, 11, 1, 16, 0))),
        (OFFICE, "FR", paris(2027, 10, 29, 18, 0), utc(2027, 11, 2, 8, 0), (utc(2027, 11, 2, 8, 0), utc(2027, 11, 2, 16, 0))),
    ],
)
def test_window_openings_across_dst(win, country, at, opening, interval):
    cal = BusinessCalendar(win, PARIS, country)
    assert cal.next_opening(at) == opening
    assert cal.open_interval(opening) == interval


def test_second_occurrence_of_an_ambiguous_hour_is_inside_the_window():
    cal = BusinessCalendar(window("sun", "02:30-04:00"), PARIS)
    assert cal.is_open(paris(2027, 10, 31, 2, 15, fold=1))  # 01:15 UTC, CET
    assert not cal.is_open(paris(2027, 10, 31, 2, 15, fold=0))  # 00:15 UTC, before the opening


# --- holidays --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "country, day, expected",
    [
        ("FR", date(2027, 7, 14), True),   # Bastille Day, a Wednesday
        ("FR", date(2026, 5, 1), True),    # Labour Day, a Friday
        ("FR", date(2027, 5, 6), True),    # Ascension Thursday
        ("FR", date(2027, 7, 13), False),
        ("fr", date(2027, 7, 14), True),   # codes are case-insensitive
        ("US", date(2027, 7, 5), True),    # Independence Day observed on Monday
        ("US", date(2027, 7, 14), False),
        (None, date(2027, 7, 14), False),
    ],
)
def test_is_holiday(country, day, expected):
    assert BusinessCalendar(OFFICE, PARIS, country).is_holiday(day) is expected


@pytest.mark.parametrize(
    "at, with_fr, without",
    [
        (paris(2027, 7, 13, 18, 0), utc(2027, 7, 15, 7, 0), utc(2027, 7, 14, 7, 0)),  # 14 July skipped
        (paris(2026, 4, 30, 18, 0), utc(2026, 5, 4, 7, 0), utc(2026, 5, 1, 7, 0)),    # 1 May Friday -> Monday
        (paris(2027, 5, 5, 17, 30), utc(2027, 5, 7, 7, 0), utc(2027, 5, 6, 7, 0)),    # Ascension skipped
    ],
)
def test_french_holidays_are_skipped(at, with_fr, without):
    assert BusinessCalendar(OFFICE, PARIS, "FR").next_opening(at) == with_fr
    assert BusinessCalendar(OFFICE, PARIS).next_opening(at) == without


def test_an_interval_started_the_evening_before_a_holiday_runs_into_it():
    cal = BusinessCalendar(NIGHT, PARIS, "FR")
    assert cal.is_open(paris(2027, 7, 14, 1, 0))  # Tuesday's night shift
    assert not cal.is_open(paris(2027, 7, 14, 23, 0))  # none starts on the holiday
    assert cal.next_opening(paris(2027, 7, 14, 12, 0)) == utc(2027, 7, 15, 20, 0)


def test_unknown_country_is_a_user_error():
    with pytest.raises(UserInputError):
        BusinessCalendar(OFFICE, PARIS, "ZZ")


# --- business days ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "country, start, amount, expected",
    [
        (None, paris(2027, 1, 15, 10, 0), 1, paris(2027, 1, 18, 10, 0)),   # Friday + 1 = Monday
        (None, paris(2027, 1, 15, 10, 0), 5, paris(2027, 1, 22, 10, 0)),   # Friday + 5 = next Friday
        (None, paris(2027, 1, 13, 10, 0), 2, paris(2027, 1, 15, 10, 0)),   # Wednesday + 2 = Friday
        (None, paris(2027, 1, 16, 10, 0), 1, paris(2027, 1, 18, 10, 0)),   # Saturday + 1 = Monday
        (None, paris(2027, 1, 17, 10, 0), 1, paris(2027, 1, 18, 10, 0)),   # Sunday + 1 = Monday
        ("FR", paris(2027, 7, 13, 10, 0), 1, paris(2027, 7, 15, 10, 0)),   # across 14 July
        (None, paris(2027, 7, 13, 10, 0), 1, paris(2027, 7, 14, 10, 0)),
        ("FR", paris(2027, 7, 14, 10, 0), 1, paris(2027, 7, 15, 10, 0)),   # from the holiday itself
        ("FR", paris(2026, 4, 30, 10, 0), 1, paris(2026, 5, 4, 10, 0)),    # 1 May Friday + weekend
        ("FR", paris(2027, 5, 5, 10, 0), 1, paris(2027, 5, 7, 10, 0)),     # Ascension
        ("FR", paris(2027, 3, 26, 10, 0), 1, paris(2027, 3, 30, 10, 0)),   # weekend + DST + Easter Monday
        ("FR", paris(2027, 1, 15, 10, 0), 0, paris(2027, 1, 15, 10, 0)),
    ],
)
def test_business_day_waits(country, start, amount, expected):
    cal = BusinessCalendar(OFFICE, PARIS, country)
    assert cal.add_wait(start, Wait(amount=amount, unit="business_days")) == expected


def test_business_days_ignore_a_weekend_window():
    cal = BusinessCalendar(window("mon-sun", "09:00-17:00"), PARIS)
    assert cal.add_wait(paris(2027, 1, 15, 10, 0), Wait.model_validate("1 business day")) == paris(2027, 1, 18, 10, 0)


# --- due_time --------------------------------------------------------------------------


def test_due_time_inside_the_window_gets_no_jitter():
    cal = BusinessCalendar(LUNCH, PARIS, "FR")
    start = paris(2027, 1, 12, 10, 0)
    assert cal.due_time(start, Wait.model_validate("1 day"), "p1:s2", 15) == utc(2027, 1, 13, 9, 0)


def test_due_time_moved_to_an_opening_gets_jitter_within_the_interval():
    cal = BusinessCalendar(LUNCH, PARIS, "FR")
    start = paris(2027, 1, 13, 12, 0)
    got = cal.due_time(start, Wait.model_validate("30 minutes"), "p1:s2", 15)  # 12:30 -> 14:00 + jitter
    assert got == utc(2027, 1, 13, 13, 0) + timedelta(seconds=jitter_seconds("p1:s2", 15))
    assert got == cal.due_time(start, Wait.model_validate("30 minutes"), "p1:s2", 15)  # deterministic
    assert cal.due_time(start, Wait.model_validate("30 minutes"), "p1:s2", 0) == utc(2027, 1, 13, 13, 0)


def test_due_time_without_wait():
    cal = BusinessCalendar(LUNCH, PARIS)
    assert cal.due_time(paris(2027, 1, 13, 10, 0), None, "k", 15) == utc(2027, 1, 13, 9, 0)
    moved = cal.due_time(paris(2027, 1, 13, 12, 30), None, "k", 15)
    assert utc(2027, 1, 13, 13, 0) <= moved < utc(2027, 1, 13, 13, 15)


def test_jitter_wraps_to_stay_inside_a_short_interval():
    cal = BusinessCalendar(window("mon-fri", "09:00-09:05"), PARIS)
    opening, end = utc(2027, 1, 13, 8, 0), utc(2027, 1, 13, 8, 5)
    results = [cal.due_time(paris(2027, 1, 13, 7, 0), None, f"prospect-{i}", 60) for i in range(300)]
    assert all(opening <= r < end for r in results)
    assert len(set(results)) > 100
    for i, got in enumerate(results[:20]):
        jitter = jitter_seconds(f"prospect-{i}", 60)
        assert got == opening + timedelta(seconds=jitter if jitter < 300 else jitter % 300)


def test_prospects_in_new_york_and_paris_get_different_due_times():
    start = utc(2027, 1, 11, 20, 0)  # Monday: 21:00 in Paris, 15:00 in New York
    wait = Wait.model_validate("1 day")
    in_paris = BusinessCalendar(OFFICE, PARIS, "FR").due_time(start, wait, "p", 15)
    in_ny = BusinessCalendar(OFFICE, NY, "US").due_time(start, wait, "p", 15)
    assert in_ny == utc(2027, 1, 12, 20, 0)  # Tuesday 15:00 EST, inside the window
    assert in_paris == utc(2027, 1, 13, 8, 0) + timedelta(seconds=jitter_seconds("p", 15))  # Wednesday 09:00 CET
    assert in_paris != in_ny


def test_due_time_across_spring_forward():
    cal = BusinessCalendar(OFFICE, PARIS)
    # Friday 16:30 CET + 1 day = Saturday -> Monday 09:00 CEST, which is 07:00 UTC (not 08:00)
    got = cal.due_time(paris(2027, 3, 26, 16, 30), Wait.model_validate("1 day"), "k", 0)
    assert got == utc(2027, 3, 29, 7, 0)


# --- termination -----------------------------------------------------------------------


@pytest.fixture
def every_day_a_holiday(monkeypatch):
    class Everything:
        def __contains__(self, day):
            return True

    monkeypatch.setattr(calmod, "_country_holidays", lambda country, year: Everything())
    calmod._rules_for.cache_clear()
    yield
    calmod._rules_for.cache_clear()


def test_a_window_that_never_opens_raises(every_day_a_holiday):
    cal = BusinessCalendar(window("mon-sun", "09:00-17:00"), PARIS, "FR")
    at = paris(2027, 1, 13, 10, 0)
    assert not cal.is_open(at)
    assert cal.open_interval(at) is None
    with pytest.raises(UserInputError, match="window never opens"):
        cal.next_opening(at)
    with pytest.raises(UserInputError, match="window never opens"):
        cal.due_time(at, Wait.model_validate("1 day"), "k", 15)
    with pytest.raises(UserInputError):
        cal.add_wait(at, Wait.model_validate("1 business day"))
